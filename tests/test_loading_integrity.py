"""Files a user names never run code, and every bad one is reported in one line (issues 10 and 11)."""

import os

import pytest
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.errors import UsageError
from training_runs import train_loop


class _RunsCode:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.makedirs, ("PWNED_BY_CHECKPOINT",))


def _one_line_error(call):
    """The UsageError message of call(), checked to be one line without PyTorch's unsafe advice."""
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message, message
    return message


def _optimizer_state():
    """The state dict of an AdamW that took one step: tensors, numbers, lists and dicts."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


def test_optimizer_state_loads_with_upstream_keywords(tmp_path):
    path = tmp_path / "opt000010.pt"
    state = _optimizer_state()
    torch.save(state, path)
    for kwargs in ({}, {"map_location": "cpu"}, {"map_location": "cpu", "weights_only": True}, {"weights_only": False}):
        loaded = dist_util.load_state_dict(str(path), **kwargs)
        assert loaded["param_groups"] == state["param_groups"]
        assert torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


@pytest.mark.parametrize("weights_only", [None, True, False])
def test_pickled_code_is_refused_and_never_run(tmp_path, monkeypatch, weights_only):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode()}, path)
    kwargs = {} if weights_only is None else {"weights_only": weights_only}
    message = _one_line_error(lambda: dist_util.load_state_dict(str(path), **kwargs))
    assert "holds pickled Python objects or code" in message and "torch.save(model.state_dict(), path)" in message
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_directory_as_checkpoint(tmp_path):
    message = _one_line_error(lambda: dist_util.load_state_dict(str(tmp_path)))
    assert message == f"checkpoint {tmp_path} is a directory: name the checkpoint file (.pt or .safetensors) itself"


@pytest.mark.parametrize("header", [b"\xff" * 8 + b"junk", (64).to_bytes(8, "little") + b"{not json" + b" " * 64], ids=["huge-length", "bad-json"])
def test_bad_safetensors_header(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(header)
    message = _one_line_error(lambda: dist_util.load_state_dict(str(path)))
    assert message.startswith(f"cannot read {path} (") and "bad .safetensors header" in message


def test_html_page_as_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"<html><body>Not Found</body></html>")
    message = _one_line_error(lambda: dist_util.load_state_dict(str(path)))
    assert "not a PyTorch checkpoint" in message and message.endswith("fetch or save it again)")


def test_model_loading_still_requires_tensors(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save(_optimizer_state(), path)
    message = _one_line_error(lambda: dist_util.load_model_state_dict(str(path)))
    assert message.endswith("is not a state dict of tensors (save one with torch.save(model.state_dict(), path))")


# ---------------------------------------------------------------- resuming training


def _trained_run(tmp_path):
    """A log directory holding model/opt/ema checkpoints of 2 steps of a tiny model."""
    with logger.scoped_configure(dir=str(tmp_path), format_strs=[]):
        train_loop().run_loop()
    assert (tmp_path / "opt000002.pt").exists()


def _resume(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=[]):
        return train_loop(lr_anneal_steps=4)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"<html>Not Found</html>"], ids=["empty", "zeros", "html"])
def test_corrupt_optimizer_file_on_resume(tmp_path, content):
    _trained_run(tmp_path)
    (tmp_path / "opt000002.pt").write_bytes(content)
    message = _one_line_error(lambda: _resume(tmp_path))
    assert message.startswith(f"cannot read checkpoint {tmp_path / 'opt000002.pt'} ({len(content)} bytes): ")
    assert message.endswith("; or delete it to resume with a fresh optimizer state")


def test_optimizer_file_of_another_model_on_resume(tmp_path):
    _trained_run(tmp_path)
    torch.save(_optimizer_state(), tmp_path / "opt000002.pt")
    message = _one_line_error(lambda: _resume(tmp_path))
    assert message.startswith(f"optimizer state {tmp_path / 'opt000002.pt'} does not fit this model's optimizer (")
    assert message.endswith("or delete it to resume with a fresh optimizer state")


def test_optimizer_file_with_pickled_code_on_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _trained_run(tmp_path)
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode()}, tmp_path / "opt000002.pt")
    assert "holds pickled Python objects or code" in _one_line_error(lambda: _resume(tmp_path))
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
