"""Builders for the fixtures' small seeded networks and their guidance functions."""

import json

import numpy as np
import torch
import torch.nn.functional as F

from conftest import FIXTURES
from guided_diffusion.checkpoints import DEFAULTS, build, parse_flags
from guided_diffusion.script_util import create_model_and_diffusion

_cache = {}


def npz(name):
    """A fixtures .npz file, opened once."""
    if name not in _cache:
        _cache[name] = np.load(FIXTURES / f"{name}.npz")
    return _cache[name]


def tensor(file, key):
    return torch.from_numpy(npz(file)[key])


def golden_flags(name, **overrides):
    """The flags of a golden network, with overrides, as a dict of flag values."""
    spec = json.loads((FIXTURES / "golden_models.json").read_text())[name]
    flags = parse_flags(spec["flags"], DEFAULTS[spec["kind"]]())
    flags.update(overrides)
    return spec["kind"], flags


def golden_state_dict(name):
    g = npz("golden_models")
    prefix = f"{name}/sd/"
    return {k[len(prefix):]: torch.from_numpy(g[k].astype(np.float32)) for k in g.files if k.startswith(prefix)}


def golden_network(name):
    """A golden network with its seeded weights loaded strictly, in eval mode."""
    kind, flags = golden_flags(name)
    net = build(kind, flags)
    net.load_state_dict(golden_state_dict(name), strict=True)
    return net.eval()


def golden_model_and_diffusion(name, **overrides):
    """A golden UNet and the diffusion its flags describe (with overrides, e.g. respacing)."""
    _, flags = golden_flags(name, **overrides)
    _, diffusion = create_model_and_diffusion(**flags)
    return golden_network(name), diffusion


def classifier_grad_fn(classifier, scale):
    """cond_fn = scale * d/dx log softmax(classifier(x, t))[y], as ADM's classifier_sample.py."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(y)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def without_labels(model):
    """An unconditional network that ignores the y passed to every model in the loop."""
    return lambda x, t, y=None: model(x, t)
