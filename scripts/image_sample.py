"""Sample a batch of images from a diffusion model and save it as an .npz (labels too for class-conditional models).

    mpiexec -n N python scripts/image_sample.py --model_path models/256x256_diffusion_uncond.pt --num_samples 100
"""

from guided_diffusion import sampling
from guided_diffusion.script_util import model_and_diffusion_defaults


def main():
    parser = sampling.create_argparser(sampling.sampling_defaults(), model_and_diffusion_defaults(), description=__doc__)
    args, explicit = sampling.start(parser)
    checkpoint = sampling.Checkpoint(args, explicit, "model_path", "model", model_and_diffusion_defaults())
    flags = checkpoint.flags
    out = sampling.Output(args, args.num_samples, flags["image_size"])
    if out.finished():
        return
    model, diffusion = checkpoint.load()
    task = sampling.Task(
        diffusion,
        sampling.label_aware(model, flags["class_cond"]),
        (3, flags["image_size"], flags["image_size"]),
        num_classes=flags["num_classes"] if flags["class_cond"] else None,
    )
    sampling.sample(args, task, out)


if __name__ == "__main__":
    sampling.run_script(main)
