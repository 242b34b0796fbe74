"""Every published checkpoint's architecture is reproduced from its flags; bad files fail in one line."""

import json

import pytest
import torch

from conftest import FIXTURES
from guided_diffusion import dist_util
from guided_diffusion.checkpoints import DEFAULTS, OFFICIAL, build, identify, load_weights, mismatch_message, parse_flags
from guided_diffusion.errors import UsageError
from guided_diffusion.script_util import create_model

MANIFESTS = json.loads((FIXTURES / "checkpoint_manifests.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_official_architecture_matches_manifest(name):
    entry = MANIFESTS[name]
    with torch.device("meta"):
        model = build(entry["kind"], parse_flags(entry["flags"], DEFAULTS[entry["kind"]]()))
    keys = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert keys == entry["keys"]  # same keys, shapes and registration order
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_our_flag_table_matches_the_readme_flags(name):
    kind, flags = OFFICIAL[f"{name}.pt"]
    entry = MANIFESTS[name]
    assert kind == entry["kind"]
    assert parse_flags(flags, DEFAULTS[kind]()) == parse_flags(entry["flags"], DEFAULTS[kind]())


def test_identify_recognises_official_state_dicts():
    entry = MANIFESTS["256x256_diffusion_uncond"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"]}
    names = identify(state_dict)
    assert "256x256_diffusion_uncond.pt" in names and "lsun_bedroom.pt" in names  # one architecture
    assert "256x256_diffusion.pt" not in names
    del state_dict["out.2.bias"]
    assert identify(state_dict) == []


def _tiny(**overrides):
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16")
    flags.update(overrides)
    return create_model(**flags)


def test_wrong_flags_give_one_line_with_counts(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(_tiny(class_cond=True, learn_sigma=True).state_dict(), path)
    with pytest.raises(UsageError) as err:
        load_weights(_tiny(), path)
    message = str(err.value)
    assert "\n" not in message
    assert "1 unexpected keys (label_emb.weight)" in message
    assert "2 mis-shaped" in message and "out.2.weight [6, 32, 3, 3] vs [3, 32, 3, 3]" in message
    assert "pass the flags it was trained with" in message
    loaded = load_weights(_tiny(class_cond=True, learn_sigma=True), path)  # the right flags load
    assert torch.equal(loaded.out[2].bias, torch.load(path, weights_only=True)["out.2.bias"])


def test_official_checkpoint_with_wrong_flags_names_the_flag_string():
    entry = MANIFESTS["64x64_classifier"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"]}
    with torch.device("meta"):
        model = build("classifier", DEFAULTS["classifier"]())  # forgot --classifier_depth 4
    message = mismatch_message(model, state_dict, "64x64_classifier.pt")
    assert "\n" not in message
    assert "24 missing keys (input_blocks.4.0.skip_connection.weight," in message
    assert "140 unexpected keys" in message and "87 mis-shaped" in message and "and 84 more" in message
    assert message.endswith("it is the official 64x64_classifier.pt: use --image_size 64 --classifier_depth 4")


def test_corrupt_missing_and_non_state_dict_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_tiny().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UsageError, match=r"^cannot read checkpoint .*truncated.pt .*fetch or save it again\)$"):
        dist_util.load_state_dict(str(truncated))
    with pytest.raises(UsageError, match="^checkpoint not found: .*nothing.pt"):
        dist_util.load_state_dict(str(tmp_path / "nothing.pt"))
    other = tmp_path / "other.pt"
    torch.save({"step": 3, "weights": [1, 2]}, other)
    with pytest.raises(UsageError, match="is not a state dict of tensors"):
        dist_util.load_model_state_dict(str(other))


def test_safetensors_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    model = _tiny()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = load_weights(_tiny(), str(tmp_path / "m.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
