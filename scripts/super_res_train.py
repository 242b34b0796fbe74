"""Train a super-resolution diffusion model on a folder of images (MPI data-parallel)."""

import torch.nn.functional as F

from guided_diffusion import harness, logger
from guided_diffusion.checkpoints import make_sidecar
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import args_to_dict, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults
from guided_diffusion.train_scripts import setup, train, train_defaults


def create_argparser():
    """The script's flags, grouped, with help."""
    return harness.create_argparser(__doc__, train_defaults(), sr_model_and_diffusion_defaults(), context="train")


def main():
    """Build the upsampler and diffusion from flags and train them on data_dir."""
    args = create_argparser().parse_args()
    setup()
    data = load_superres_data(args.data_dir, args.batch_size, args.large_size, args.small_size, args.class_cond, args.random_flip)
    logger.log("creating model and diffusion...")
    model, diffusion = sr_create_model_and_diffusion(**args_to_dict(args, sr_model_and_diffusion_defaults().keys()))
    train(args, model, diffusion, data, make_sidecar("sr", args, sr_model_and_diffusion_defaults()))


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False, random_flip=True):
    """Batches at large_size, with their area-downsampled small_size copies as the `low_res` condition."""
    data = load_data(data_dir=data_dir, batch_size=batch_size, image_size=large_size, class_cond=class_cond, random_flip=random_flip)
    return ((large_batch, {**model_kwargs, "low_res": F.interpolate(large_batch, small_size, mode="area")}) for large_batch, model_kwargs in data)


if __name__ == "__main__":
    harness.run_script(main)
