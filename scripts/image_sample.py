"""Sample images from a diffusion model and save them as an .npz (labels too for class-conditional models).

    mpiexec -n N python scripts/image_sample.py --model_path models/256x256_diffusion_uncond.pt --num_samples 100
"""

from guided_diffusion import harness, sampling
from guided_diffusion.sampling_flags import sampling_defaults, start
from guided_diffusion.sampling_networks import Checkpoint, label_aware
from guided_diffusion.sampling_output import Output
from guided_diffusion.script_util import model_and_diffusion_defaults


def create_argparser():
    """The script's flags, grouped, with help."""
    return harness.create_argparser(__doc__, sampling_defaults(), model_and_diffusion_defaults())


def main():
    args, explicit = start(create_argparser())
    checkpoint = Checkpoint(args, explicit, "model_path", "model", model_and_diffusion_defaults())
    flags = checkpoint.flags
    out = Output(args, args.num_samples, flags["image_size"], [checkpoint])
    if not out.claim():
        return
    model, diffusion = checkpoint.load()
    task = sampling.Task(
        diffusion,
        label_aware(model, flags["class_cond"]),
        (3, flags["image_size"], flags["image_size"]),
        num_classes=flags["num_classes"] if flags["class_cond"] else None,
    )
    sampling.sample(args, task, out)


if __name__ == "__main__":
    harness.run_script(main)
