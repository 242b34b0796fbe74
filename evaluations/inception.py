"""InceptionV3 features as the ADM evaluator's TensorFlow graph computes them.

The network is torch-fidelity's port of the 2015-12-05 TensorFlow InceptionV3 graph (the same
converted weights as pytorch-fid), which resizes uint8 images to 299x299 inside the network
with TensorFlow 1's bilinear rule. It gives `pool_3` (2048) and the class logits; the
spatial sFID features (`mixed_6/conv`, TensorFlow's name for `Mixed_6d.branch1x1` after its
batch norm and ReLU) are taken with a forward hook. torch-fidelity is imported only here,
and only when a network is built. Its loader unpickles weights files with code execution
allowed, so it is never given one: the weights are read by the project's checkpoint reader,
with `weights_only=True`.
"""

import io
import os
from collections import namedtuple

import numpy as np
import torch
from torch.hub import download_url_to_file

from evaluations.metrics import default_device
from guided_diffusion.npz_io import InputError
from guided_diffusion.dist_util import load_model_state_dict
from guided_diffusion.errors import UsageError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels: 7 * 17 * 17 = 2023 values

Features = namedtuple("Features", ["pool", "spatial", "probs"])
Features.__doc__ = "Per-image pool_3 [N, 2048], spatial [N, 2023] (HWC order) and class probabilities [N, 1008]."


def cached_weights_path():
    """Where torch-fidelity keeps the weights: torch hub's checkpoint cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def resolve_weights(path=None):
    """The weights file: `path` if given, else the cached copy, downloading it there once."""
    if path:
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such InceptionV3 weights file")
        return path
    cached = cached_weights_path()
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            download_url_to_file(WEIGHTS_URL, cached)
        except OSError as err:
            raise InputError(
                f"InceptionV3 weights are not in {cached} and could not be downloaded ({err}); "
                f"fetch {WEIGHTS_URL} and pass --inception_path"
            ) from None
    return cached


def load_weights(path):
    """The tensors of a weights file, read as plain tensors (weights_only): a file holding code is refused unrun."""
    try:
        state_dict = load_model_state_dict(path, map_location="cpu")
    except UsageError as err:
        raise InputError(f"{path}: not a usable InceptionV3 weights file ({err})") from None
    if not all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point()):
        raise InputError(f"{path}: not a usable InceptionV3 weights file (it holds NaN or infinite values)")
    return state_dict


def _network(features=("2048", "logits_unbiased")):
    """torch-fidelity's InceptionV3 port (imported on demand) with its initial weights.

    Its constructor always torch.loads a weights file with code execution allowed; it is handed an
    in-memory empty state dict made here instead, which the subclass's load_state_dict skips.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            """Loads weights strictly, except the constructor's empty placeholder."""
            if state_dict:
                return super().load_state_dict(state_dict, strict, assign)

    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    return InceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=placeholder)


def _mismatch(state_dict, net):
    """One phrase naming how the keys and shapes of state_dict differ from net's, or None.

    Batch norms' `num_batches_tracked` counters may be absent: the converted TensorFlow weights
    have none, and load_state_dict fills them in.
    """
    expected = {
        k: tuple(v.shape)
        for k, v in net.state_dict().items()
        if k in state_dict or not k.endswith(".num_batches_tracked")
    }
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    differing = sorted(set(expected.items()) ^ set(found.items()))
    if not differing:
        return None
    key, _ = differing[0]
    shape = lambda shapes: list(shapes[key]) if key in shapes else "absent"  # noqa: E731
    return (
        f"{len(found)} tensors where InceptionV3 has {len(expected)}, {len(differing)} (key, shape) pairs differ, "
        f"first {key}: {shape(found)} in the file, {shape(expected)} in the network"
    )


def spatial_layer(net):
    """The module whose output is TensorFlow's mixed_6/conv: Mixed_6d's 1x1 branch (conv, BN, ReLU)."""
    return net.Mixed_6d.branch1x1


class InceptionFeatures:
    """Callable mapping NHWC uint8 image batches to their Features."""

    def __init__(self, weights_path=None, device=None):
        path = resolve_weights(weights_path)
        state_dict = load_weights(path)
        self.device = torch.device(device) if device else default_device()
        torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions, as in the reference graph
        self.net = _network()
        mismatch = _mismatch(state_dict, self.net)
        if mismatch:
            raise InputError(f"{path}: not a usable InceptionV3 weights file ({mismatch})")
        self.net.load_state_dict(state_dict)
        self.net.to(self.device)
        self._spatial = None
        spatial_layer(self.net).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        """Forward hook: remembers the mixed_6/conv output [N, 192, 17, 17] of the current batch."""
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images):
        """Features of an [N, H, W, 3] uint8 array (any H, W: the network resizes to 299x299)."""
        batch = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device).permute(0, 3, 1, 2)
        pool, logits = self.net(batch)  # ADM's softmax graph applies the logits weights without bias
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(batch), -1)
        probs = torch.softmax(logits, dim=1)
        return Features(*(t.float().cpu().numpy() for t in (pool, spatial, probs)))


def seeded_state_dict(seed=0):
    """Random InceptionV3 weights in the real file's layout, for offline tests and timing.

    Convolutions get He-normal weights and batch norms random affine terms and statistics,
    so that features differ between images (PyTorch's default init lets them fade with depth).
    """
    net = _network(["2048"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _randomise(net, gen)
    return {name: value.clone() for name, value in net.state_dict().items()}


def _randomise(net, gen):
    """Draws every parameter and batch-norm statistic of `net` from `gen` (see seeded_state_dict)."""
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(1 + 0.1 * torch.rand(module.running_var.shape, generator=gen))
        elif isinstance(module, torch.nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features**0.5)
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
