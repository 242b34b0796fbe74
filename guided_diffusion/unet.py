"""The ADM networks: the diffusion UNet, its super-resolution variant and the noisy classifier.

Module names and registration order follow openai/guided-diffusion exactly, so the published
checkpoints load with `strict=True`.
"""

from abc import abstractmethod

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to x given the timestep embedding emb."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:  # 3D signals are upsampled in their inner two dimensions only
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 convolution, or by average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding, optionally resampling.

    With `use_scale_shift_norm` the embedding modulates the second normalisation as
    norm(h) * (1 + scale) + shift (FiLM); otherwise it is added to h.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attend(q, k, v):
    """Softmax attention of [N, heads, T, C] tensors (last axis contiguous); returns [N, T, heads*C].

    Equal to scaling q and k by C^-1/4 each, as the original does. Token-major inputs let
    scaled_dot_product_attention pick its fused kernels (flash attention on CPU and GPU),
    which keep the softmax accumulation in float32.
    """
    n, heads, length, ch = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, heads * ch)


def count_flops_attn(model, _x, y):
    """Add an attention's matrix-product operations to `model.total_ops` (a custom op for `thop`).

    Use as `thop.profile(net, inputs, custom_ops={QKVAttention: QKVAttention.count_flops})`.
    y is the attention's output [N, H*C, T]: the weights and the weighted sum of the values
    each take N * T^2 * H*C multiply-adds.
    """
    b, c, *spatial = y.shape
    num_spatial = int(np.prod(spatial))
    model.total_ops += th.DoubleTensor([2 * b * num_spatial**2 * c])


class _QKVAttentionBase(nn.Module):
    """Multi-head attention of qkv projections; subclasses say how the channels are ordered."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """[N, 3*H*C, T] -> [N, H*C, T], upstream's interface."""
        return self.attend_tokens(qkv.transpose(1, 2)).transpose(1, 2)

    def attend_tokens(self, qkv):
        """[N, T, 3*H*C] -> [N, T, H*C]: attention on token-major projections."""
        n, length, width = qkv.shape
        q, k, v = self._split(qkv, width // (3 * self.n_heads))
        return _attend(q, k, v)

    @staticmethod
    def count_flops(model, _x, y):
        """The thop counter of this module: see count_flops_attn."""
        return count_flops_attn(model, _x, y)


class QKVAttentionLegacy(_QKVAttentionBase):
    """Attention on qkv channels grouped per head: [q, k, v] of head 0, then of head 1..."""

    def _split(self, qkv, ch):
        """[N, T, H*3*C] -> q, k, v, each [N, H, T, C]."""
        n, length, _ = qkv.shape
        return qkv.reshape(n, length, self.n_heads, 3, ch).permute(3, 0, 2, 1, 4).unbind(0)


class QKVAttention(_QKVAttentionBase):
    """Attention on qkv channels ordered all q, then all k, then all v (`use_new_attention_order`)."""

    def _split(self, qkv, ch):
        """[N, T, 3*H*C] -> q, k, v, each [N, H, T, C]."""
        n, length, _ = qkv.shape
        return qkv.reshape(n, length, 3, self.n_heads, ch).permute(2, 0, 3, 1, 4).unbind(0)


def _pointwise(conv, tokens):
    """A 1x1 Conv1d applied to token-major [N, T, C] input as a matrix product (no im2col)."""
    return F.linear(tokens, conv.weight[:, :, 0], conv.bias)


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions, with a residual connection."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, f"{channels} channels are not divisible into heads of {num_head_channels}"
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        tokens = self.norm(x).transpose(1, 2)  # [b, T, c]: the projections run as matrix products
        h = _pointwise(self.proj_out, self.attention.attend_tokens(_pointwise(self.qkv, tokens)))
        return (x + h.transpose(1, 2)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """Attention pooling (as in CLIP): the mean token attends over all positions."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        tokens = (x + self.positional_embedding[None].to(x.dtype)).transpose(1, 2)
        pooled = self.attention.attend_tokens(_pointwise(self.qkv_proj, tokens))[:, 0]
        return F.linear(pooled, self.c_proj.weight[:, :, 0], self.c_proj.bias)  # only the mean token is used


class _EncoderLayout:
    """Builds the shared encoder half (input blocks and middle block) of the UNet and the classifier."""

    def _build_encoder(
        self,
        in_channels,
        model_channels,
        num_res_blocks,
        attention_resolutions,
        dropout,
        channel_mult,
        conv_resample,
        dims,
        use_checkpoint,
        num_heads,
        num_head_channels,
        use_scale_shift_norm,
        resblock_updown,
        use_new_attention_order,
    ):
        """Create `input_blocks` and `middle_block`; return the skip widths and final (ch, ds)."""
        emb_dim = model_channels * 4
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers = [ResBlock(ch, emb_dim, dropout, out_ch, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(ch, num_heads, num_head_channels, use_checkpoint, use_new_attention_order)
                    )
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = ResBlock(ch, emb_dim, dropout, ch, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, down=True)
                else:
                    down = Downsample(ch, conv_resample, dims=dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm),
            AttentionBlock(ch, num_heads, num_head_channels, use_checkpoint, use_new_attention_order),
            ResBlock(ch, emb_dim, dropout, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm),
        )
        return skip_channels, ch, ds

    @property
    def dtype(self):
        """The dtype the blocks compute in: float16 after `convert_to_fp16()`, else float32."""
        return self.input_blocks[0][0].weight.dtype


class UNetModel(_EncoderLayout, nn.Module):
    """The ADM denoising UNet: predicts eps (and the variance interpolation v) from (x_t, t[, y]).

    :param attention_resolutions: downsampling factors (image_size // resolution) with attention.
    :param num_classes: if set, the model is class-conditional with that many labels.
    :param num_heads_upsample: heads in the decoder's attention; -1 means num_heads.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16  # the scripts call convert_to_fp16() on CUDA
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        skip_channels, ch, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
            resblock_updown, use_new_attention_order,
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers = [
                    ResBlock(ch + skip_channels.pop(), emb_dim, dropout, out_ch, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
                ]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(ch, num_heads_upsample, num_head_channels, use_checkpoint, use_new_attention_order)
                    )
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(ResBlock(ch, emb_dim, dropout, ch, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, int(model_channels * channel_mult[0]), out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """Convert the convolutions of the torso to float16 (embeddings and `out` stay float32)."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo `convert_to_fp16()`."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f32)

    def forward(self, x, timesteps, y=None):
        """Predict [N, out_channels, H, W] from x_t [N, C, H, W], timesteps [N] and labels y [N]."""
        assert (y is not None) == (self.num_classes is not None), "labels must be given iff the model is class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)
        h = x.type(self.dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(th.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class SuperResModel(UNetModel):
    """A UNet that also sees a low-resolution image, upsampled bilinearly and concatenated to x."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_EncoderLayout, nn.Module):
    """The noisy classifier: the UNet's encoder half and middle block, then a pooling head.

    :param pool: "attention" (the published classifiers), "adaptive", "spatial" or "spatial_v2".
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.pool = pool

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        skip_channels, ch, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
            resblock_updown, use_new_attention_order,
        )
        spatial_width = sum(skip_channels) + ch  # the spatial pools see every block's mean
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten(),
            )
        elif pool == "attention":
            assert num_head_channels != -1, "attention pooling needs num_head_channels"
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(spatial_width, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(spatial_width, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, out_channels)
            )
        else:
            raise NotImplementedError(f"unknown classifier pool {pool!r}: use attention, adaptive, spatial or spatial_v2")

    def convert_to_fp16(self):
        """Convert the convolutions of the torso to float16."""
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo `convert_to_fp16()`."""
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(convert_module_to_f32)

    def forward(self, x, timesteps):
        """Class logits [N, out_channels] for noisy images x_t at timesteps."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x.type(self.dtype)
        pooled = []
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                pooled.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            pooled.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(th.cat(pooled, dim=-1))
        return self.out(h.type(x.dtype))
