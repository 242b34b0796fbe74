"""A tiny model, flat-colour data and a TrainLoop on them, shared by the training tests."""

import torch

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4", num_head_channels=32, diffusion_steps=100)


def tiny_model_and_diffusion(**overrides):
    """A seeded 8x8 model and its diffusion, with flag overrides."""
    flags = {**model_and_diffusion_defaults(), **TINY, **overrides}
    torch.manual_seed(0)
    return create_model_and_diffusion(**flags)


def flat_batches(batch_size=2):
    """Endless (images, {}) batches of flat-colour 8x8 images."""
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(batch_size, 3, 1, 1, generator=gen).repeat(1, 1, 8, 8) * 2 - 1, {}


def train_loop(**overrides):
    """A TrainLoop of a tiny model on flat-colour images, saving to the logger's directory."""
    model, diffusion = tiny_model_and_diffusion()
    kwargs = dict(
        model=model, diffusion=diffusion, data=flat_batches(), batch_size=2, microbatch=-1, lr=1e-3,
        ema_rate="0.9", log_interval=1, save_interval=2, resume_checkpoint="", lr_anneal_steps=2,
    )
    return TrainLoop(**{**kwargs, **overrides})
