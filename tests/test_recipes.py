"""The recipes rebuild exactly the reference's inputs: every array hashes as recorded in recipes.json."""

import pytest
import torch

from helpers import NETS, golden_architecture, golden_weights
from recipes import RECIPES, eval_input, normal_input, sha256

NORMAL_INPUTS = {
    "models/x": RECIPES["models"]["x"],
    "models/x64": RECIPES["models"]["x64"],
    "models/sr/low_res": NETS["sr"]["low_res"],
    "sampling/x": RECIPES["sampling"]["x"],
    **{f"noise/{name}": spec for name, spec in RECIPES["sampling"]["noise"].items()},
    **{f"noises/{name}": spec for name, spec in RECIPES["sampling"]["noises"].items()},
}


@pytest.mark.parametrize("name", sorted(NORMAL_INPUTS))
def test_normal_inputs_match_their_hashes(name):
    spec = NORMAL_INPUTS[name]
    array = normal_input(spec)
    assert array.shape == tuple(spec["shape"]) and sha256(array) == spec["sha256"]


@pytest.mark.parametrize("name", ["ref_acts", "sample_acts", "is_probs"])
def test_evaluator_inputs_match_their_hashes(name):
    assert sha256(eval_input(RECIPES["eval"][name])) == RECIPES["eval"][name]["sha256"]


@pytest.mark.parametrize("name", sorted(NETS))
def test_golden_weights_fit_the_network_and_match_their_hash(name):
    with torch.device("meta"):
        net = golden_architecture(name)
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == NETS[name]["keys"]  # same order too
    assert sum(p.numel() for p in net.parameters()) == NETS[name]["num_params"]
    assert sha256(*golden_weights(name).values()) == NETS[name]["weights_sha256"]
