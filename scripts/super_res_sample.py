"""Upsample the images of an .npz (--base_samples, e.g. another script's output) with a super-resolution model.

Sample i upsamples base image i (cycling when --num_samples exceeds them) and keeps its label.

    python scripts/super_res_sample.py --model_path models/64_256_upsampler.pt \\
        --base_samples samples_100x64x64x3.npz --timestep_respacing 250
"""

from guided_diffusion import harness, sampling
from guided_diffusion.base_samples import BaseSamples
from guided_diffusion.sampling_flags import sampling_defaults, start
from guided_diffusion.sampling_networks import Checkpoint, label_aware
from guided_diffusion.sampling_output import Output
from guided_diffusion.script_util import sr_model_and_diffusion_defaults


def create_argparser():
    """The script's flags, grouped, with help."""
    defaults = dict(sampling_defaults(), num_samples=0)
    return harness.create_argparser(__doc__, defaults, sr_model_and_diffusion_defaults(), dict(base_samples=""), context="super_res_sample")


def main():
    args, explicit = start(create_argparser())
    checkpoint = Checkpoint(args, explicit, "model_path", "sr", sr_model_and_diffusion_defaults())
    flags = checkpoint.flags
    base = BaseSamples(args.base_samples, flags["small_size"], flags["num_classes"] if flags["class_cond"] else None)
    out = Output(args, args.num_samples or len(base), flags["large_size"], [checkpoint], files=["base_samples"])
    if not out.claim():
        return
    model, diffusion = checkpoint.load()
    task = sampling.Task(
        diffusion,
        label_aware(model, flags["class_cond"]),
        (3, flags["large_size"], flags["large_size"]),
        inputs=base.inputs,
        input_labels=base.labels is not None,
    )
    sampling.sample(args, task, out)


if __name__ == "__main__":
    harness.run_script(main)
