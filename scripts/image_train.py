"""Train a diffusion model on a folder of images (MPI data-parallel: mpiexec -n N python scripts/image_train.py ...)."""

from guided_diffusion import harness, logger
from guided_diffusion.checkpoints import make_sidecar
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_scripts import setup, train, train_defaults


def create_argparser():
    """The script's flags, grouped, with help."""
    return harness.create_argparser(__doc__, train_defaults(), model_and_diffusion_defaults(), context="train")


def main():
    """Build the model and diffusion from flags and train them on data_dir."""
    args = create_argparser().parse_args()
    setup()
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
    )
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    train(args, model, diffusion, data, make_sidecar("model", args, model_and_diffusion_defaults()))


if __name__ == "__main__":
    harness.run_script(main)
