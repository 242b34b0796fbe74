"""Small building blocks shared by the networks: layers, initialisation and embeddings."""

import math

import torch as th
import torch.nn as nn
import torch.utils.checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 statistics overflow)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (kept as a function for the original API)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling layer."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def normalization(channels):
    """The standard normalisation layer: GroupNorm with 32 groups in float32."""
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero a module's parameters (output layers start as the identity of the residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale a module's parameters in place."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def update_ema(target_params, source_params, rate=0.99):
    """Move target parameters towards source parameters: target = rate*target + (1-rate)*source."""
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embeddings [cos, sin] of (possibly fractional) timesteps, shape [N, dim]."""
    half = dim // 2
    freqs = th.exp(-math.log(max_period) * th.arange(half, dtype=th.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """Run func(*inputs), recomputing activations in the backward pass when flag is set.

    Trades compute for memory (`--use_checkpoint True`); params are used implicitly.
    """
    if flag and th.is_grad_enabled():
        return th.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
