"""Upsample the images of an .npz (--base_samples, e.g. another script's output) with a super-resolution model.

Sample i upsamples base image i (cycling when --num_samples exceeds them) and keeps its label.

    python scripts/super_res_sample.py --model_path models/64_256_upsampler.pt \\
        --base_samples samples_100x64x64x3.npz --timestep_respacing 250
"""

from guided_diffusion import sampling
from guided_diffusion.script_util import sr_model_and_diffusion_defaults


def main():
    defaults = {k: v for k, v in sampling.sampling_defaults().items() if k != "num_samples"}
    parser = sampling.create_argparser(defaults, sr_model_and_diffusion_defaults(), dict(base_samples=""), description=__doc__)
    parser.add_argument("--num_samples", type=int, default=None, help="default: one per base sample")
    args, explicit = sampling.start(parser)
    checkpoint = sampling.Checkpoint(args, explicit, "model_path", "sr", sr_model_and_diffusion_defaults())
    flags = checkpoint.flags
    base = sampling.BaseSamples(args.base_samples, flags["small_size"], flags["num_classes"] if flags["class_cond"] else None)
    out = sampling.Output(args, args.num_samples or len(base), flags["large_size"])
    if out.finished():
        return
    model, diffusion = checkpoint.load()
    task = sampling.Task(
        diffusion,
        sampling.label_aware(model, flags["class_cond"]),
        (3, flags["large_size"], flags["large_size"]),
        inputs=base.inputs,
    )
    sampling.sample(args, task, out)


if __name__ == "__main__":
    sampling.run_script(main)
