"""Classifier-free guidance with two networks: an unconditional --model_path and a conditional --cond_model_path.

eps = (1 + w) eps_c - w eps_u with w = --cond_model_scale; `--pxp_mode cls_den` (or auto, the
default) projects the conditional x0 prediction and the guidance delta against each other
(PixelAsParam, weights --dweight and --cweight), `--pxp_mode none` is plain guidance.

    python scripts/classifier_free_sample.py --model_path models/256x256_diffusion_uncond.pt \\
        --cond_model_path models/256x256_diffusion.pt --cond_model_scale 1.0 --timestep_respacing 250
"""

from guided_diffusion import harness, sampling
from guided_diffusion.errors import UsageError
from guided_diffusion.pixel_as_param import ClassifierFree, PxPConfig
from guided_diffusion.sampling_flags import sampling_defaults, start
from guided_diffusion.sampling_networks import Checkpoint, label_aware
from guided_diffusion.sampling_output import Output
from guided_diffusion.script_util import model_and_diffusion_defaults

def model_defaults():
    """The flags of both networks (class_cond is fixed by each one's role), PixelAsParam's recipe by default."""
    return {k: v for k, v in dict(model_and_diffusion_defaults(), pxp_mode="auto").items() if k != "class_cond"}


def create_argparser():
    """The script's flags, grouped, with help."""
    guidance = dict(cond_model_path="", cond_model_scale=1.0, pxp_stats="")
    return harness.create_argparser(__doc__, sampling_defaults(), model_defaults(), guidance)


def main():
    args, explicit = start(create_argparser())
    mode = "cls_den" if args.pxp_mode == "auto" else args.pxp_mode  # the recipe of a conditional guide
    PxPConfig(mode=mode).require(("den", "cls"), "classifier-free guidance")  # refused before any loading
    uncond = Checkpoint(args, explicit, "model_path", "model", dict(model_defaults(), class_cond=False))
    cond = Checkpoint(args, explicit, "cond_model_path", "model", dict(model_defaults(), class_cond=True))
    if uncond.flags["class_cond"] or not cond.flags["class_cond"]:
        raise UsageError(f"--model_path must be an unconditional model and --cond_model_path a class-conditional one ({uncond.path}, {cond.path})")
    cond.check_matches(uncond, "image_size", "diffusion_steps", "noise_schedule")
    size = uncond.flags["image_size"]
    uncond.flags["pxp_mode"] = mode
    out = Output(args, args.num_samples, size, [uncond, cond])
    if not out.claim():
        return
    model, diffusion = uncond.load()
    cond_model, _ = cond.load()
    task = sampling.Task(
        diffusion,
        label_aware(model, False),
        (3, size, size),
        num_classes=cond.flags["num_classes"],
        cfg=ClassifierFree(cond_model, args.cond_model_scale),
        stats_path=args.pxp_stats,
    )
    sampling.sample(args, task, out)


if __name__ == "__main__":
    harness.run_script(main)
