"""Small building blocks shared by the networks: layers, initialisation and embeddings."""

import math

import torch as th
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class SiLU(nn.SiLU):
    """x * sigmoid(x): torch's SiLU under upstream's name and forward(x) signature."""

    def forward(self, x):
        return F.silu(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 statistics overflow)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _layer_for_dims(dims, layers):
    """The layer class of (1D, 2D, 3D) layers for dims; ValueError for other dims."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims - 1]


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    return _layer_for_dims(dims, (nn.Conv1d, nn.Conv2d, nn.Conv3d))(*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (kept as a function for the original API)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling layer."""
    return _layer_for_dims(dims, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))(*args, **kwargs)


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

    Trades compute for memory (`--use_checkpoint True`). PyTorch's non-reentrant checkpoint
    replays dropout with the same random numbers, so gradients equal the plain ones; params
    (which func uses implicitly) are only needed by CheckpointFunction.
    """
    if flag and th.is_grad_enabled():
        return th.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


class CheckpointFunction(th.autograd.Function):
    """Upstream's gradient checkpoint as an autograd function (kept for code that calls it).

    `CheckpointFunction.apply(func, n, *inputs_then_params)` runs func on the first n tensors
    without keeping activations, and recomputes them in backward to give gradients for the
    inputs and the params. Unlike `checkpoint`, random layers are not replayed identically.
    """

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with th.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with th.enable_grad():
            # views, so that an in-place first op of run_function does not modify detached leaves
            outputs = ctx.run_function(*[x.view_as(x) for x in inputs])
        grads = th.autograd.grad(outputs, inputs + ctx.input_params, output_grads, allow_unused=True)
        del ctx.input_tensors, ctx.input_params
        return (None, None) + grads
