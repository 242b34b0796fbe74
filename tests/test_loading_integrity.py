"""Files a user names never run code, and every bad one is reported in one line (issues 10 and 11)."""

import os

import pytest
import torch

from guided_diffusion import dist_util
from guided_diffusion.errors import UsageError


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
    assert "not a PyTorch checkpoint" in message and "fetch it again" in message


def test_model_loading_still_requires_tensors(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save(_optimizer_state(), path)
    message = _one_line_error(lambda: dist_util.load_model_state_dict(str(path)))
    assert message.endswith("is not a state dict of tensors (save one with torch.save(model.state_dict(), path))")
