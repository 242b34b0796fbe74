"""The fixtures' golden networks, inputs and guidance, rebuilt from tests/fixtures/recipes.json."""

import functools

import numpy as np
import torch

from conftest import FIXTURES
from guided_diffusion.checkpoints import DEFAULTS, build, parse_flags
from guided_diffusion.sampling_networks import classifier_guidance
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.unet import EncoderUNetModel
from recipes import RECIPES, eval_input, normal_input, weights

NETS = RECIPES["models"]["nets"]
SAMPLING = RECIPES["sampling"]


@functools.cache
def npz(name):
    """A fixtures .npz file of reference outputs, opened once."""
    return np.load(FIXTURES / f"{name}.npz")


def golden_flags(name, **overrides):
    """The flags of a golden network (recipes.json), with overrides, as a dict of flag values."""
    spec = NETS[name]
    flags = parse_flags(spec["flags"], DEFAULTS[spec["kind"]]())
    flags.update(overrides)
    return flags


def golden_architecture(name):
    """A golden network, untrained: from its flags, or for classifier32 from EncoderUNetModel's kwargs."""
    spec = NETS[name]
    if spec["kind"] == "encoder":
        return EncoderUNetModel(**spec["kwargs"])
    return build(spec["kind"], golden_flags(name))


@functools.cache
def golden_weights(name):
    """A golden network's recipe weights, {key: float32 array} in state-dict order."""
    return weights(NETS[name]["weights_seed"], NETS[name]["keys"])


def golden_network(name):
    """A golden network with its recipe weights loaded strictly, in eval mode."""
    net = golden_architecture(name)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in golden_weights(name).items()}, strict=True)
    return net.eval()


def golden_model_and_diffusion(name, **overrides):
    """A golden UNet and the diffusion its flags describe (with overrides, e.g. respacing)."""
    _, diffusion = create_model_and_diffusion(**golden_flags(name, **overrides))
    return golden_network(name), diffusion


def network_inputs(name):
    """The forward arguments of golden_models.npz's `<name>/out`: (x, t) and the keyword inputs."""
    models = RECIPES["models"]
    x = torch.from_numpy(normal_input(models[NETS[name]["input"]]))
    t, y = torch.tensor(models["t"], dtype=torch.float32), torch.tensor(models["y"])
    kwargs = {"y": y} if "--class_cond True" in NETS[name].get("flags", "") else {}
    if "low_res" in NETS[name]:
        kwargs["low_res"] = torch.from_numpy(normal_input(NETS[name]["low_res"]))
    return x, t, kwargs


def sampling_inputs():
    """The sampling fixtures' x (x_t of single steps, x_T of loops) and model_kwargs with labels y."""
    return torch.from_numpy(normal_input(SAMPLING["x"])), {"y": torch.tensor(SAMPLING["y"])}


def step_noise(family, t):
    """The z of a single step at timestep index t; family is "adm", "pxp" or "cfg" (see the README)."""
    return torch.from_numpy(normal_input(SAMPLING["noise"][f"{family}/r25/t{t}"]))


def loop_noises(loop):
    """One z per step of a loop, in sampling order, e.g. loop_noises("pxp/loop25")."""
    return torch.from_numpy(normal_input(SAMPLING["noises"][loop]))


def guidance(scale):
    """The fixtures' cond_fn: scale x the gradient of classifier32's log-probability of y."""
    return classifier_guidance(golden_network("classifier32"), scale)


def without_labels(model):
    """An unconditional network that ignores the y passed to every model in the loop."""
    return lambda x, t, y=None: model(x, t)


def eval_goldens():
    """golden_eval.npz's outputs plus the evaluator inputs rebuilt from their recipes, as one dict."""
    spec = RECIPES["eval"]
    inputs = {name: eval_input(spec[name]) for name in ("ref_acts", "sample_acts", "is_probs")}
    return {**dict(npz("golden_eval")), **inputs, "is_split": spec["is_split"]}
