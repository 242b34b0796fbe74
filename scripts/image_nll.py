"""Bits per dimension of a diffusion model on a folder of images: its variational bound, summed over all
timesteps (MPI data-parallel). The model's flags come from `<model_path>.json` when it has one."""

import os

import numpy as np
import torch.distributed as dist

from guided_diffusion import dist_util, harness, logger
from guided_diffusion.checkpoints import load_weights
from guided_diffusion.errors import UsageError
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_scripts import parse_with_sidecar, setup


def create_argparser():
    """The script's flags, grouped, with help."""
    defaults = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="")
    return harness.create_argparser(__doc__, defaults, model_and_diffusion_defaults(), context="image_nll")


def main():
    """Load the model and report the mean bpd of num_samples images of data_dir (unflipped, in file order)."""
    args = parse_with_sidecar(create_argparser(), "model")
    if not args.model_path:
        raise UsageError("no --model_path given: point it at a diffusion model checkpoint")
    setup()
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        random_flip=False,
    )
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    load_weights(model, args.model_path)
    model.to(dist_util.dev())
    model.eval()
    logger.log("evaluating...")
    run_bpd_evaluation(model, diffusion, data, args.num_samples, args.clip_denoised)


def run_bpd_evaluation(model, diffusion, data, num_samples, clip_denoised):
    """Average the bound (and its per-timestep terms, saved as <term>_terms.npz) over all ranks' batches."""
    world_size = dist.get_world_size()
    all_bpd = []
    all_metrics = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        for key, term_list in all_metrics.items():
            terms = metrics[key].mean(dim=0) / world_size
            dist.all_reduce(terms)
            term_list.append(terms.cpu().numpy())
        total_bpd = metrics["total_bpd"].mean() / world_size
        dist.all_reduce(total_bpd)
        all_bpd.append(total_bpd.item())
        num_complete += world_size * batch.shape[0]
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd)}")
    if dist.get_rank() == 0:
        for name, terms in all_metrics.items():
            out_path = os.path.join(logger.get_dir(), f"{name}_terms.npz")
            logger.log(f"saving {name} terms to {out_path}")
            np.savez(out_path, np.mean(np.stack(terms), axis=0))
    dist.barrier()
    logger.log(f"mean bpd over {num_complete} images: {np.mean(all_bpd):.4f}")


if __name__ == "__main__":
    harness.run_script(main)
