"""Time a classifier-guided sampling step (UNet forward + classifier forward/backward + update).

Builds the official architectures from their README flags with seeded random weights (no
download), and reports milliseconds per step, images per second and achieved TFLOP/s (FLOPs
of one step counted by torch.utils.flop_counter) for every --pxp_mode, with the PixelAsParam
overhead relative to plain ADM-G on the same model and inputs, and the time of the direction
combination alone: the fused combiner (the sampling path) and the general one (the reference).
With --objectives N the guidance has N named objectives: the classifier and N - 1 cheap
known-pixel pulls, each a direction of its own. On CUDA it also reports the fraction of the
card's measured matrix-multiply rate in the same dtype.

    python benchmarks/sample_speed.py --arch 64 --batch_size 4 --modes none,cls_den,cls_den_div2
    python benchmarks/sample_speed.py --arch quick --objectives 2
    python benchmarks/sample_speed.py --arch 256 --dtype bf16 --channels_last True --compile True
"""

import argparse
import statistics
import time

import torch
import torch.utils.flop_counter as flop_counter

from guided_diffusion import pixel_as_param as pxp
from guided_diffusion.checkpoints import DEFAULTS, OFFICIAL, build, parse_flags
from guided_diffusion.sampling_networks import classifier_guidance, speed_up
from guided_diffusion.script_util import create_diffusion, diffusion_defaults, randomize_zeroed_convs, str2bool

# the CPU attention kernels, which torch's flop counter does not know (it counts the CUDA ones); it passes shapes
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_backward_flop_count(grad, q, k, v)
    ),
}
_DTYPES = {"float32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# --arch quick: a tiny model for smoke tests of this script
QUICK_FLAGS = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
    "--num_head_channels 32 --class_cond True --learn_sigma True",
    "--image_size 32 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 --classifier_channel_mult 1,2",
)


def official_flags(arch):
    """(model flags, classifier flags) of an official architecture: 64, 128, 256 or quick."""
    if arch == "quick":
        return QUICK_FLAGS
    return OFFICIAL[f"{arch}x{arch}_diffusion.pt"][1], OFFICIAL[f"{arch}x{arch}_classifier.pt"][1]


def build_networks(arch, device, seed=0):
    """Seeded model and classifier of an architecture, in eval mode on device, and the model flags."""
    model_flags, classifier_flags = official_flags(arch)
    model_flags = parse_flags(model_flags, DEFAULTS["model"]())
    torch.manual_seed(seed)
    model = randomize_zeroed_convs(build("model", model_flags))
    classifier = randomize_zeroed_convs(build("classifier", parse_flags(classifier_flags, DEFAULTS["classifier"]())))
    return model.to(device).eval(), classifier.to(device).eval(), model_flags


def seconds(fn, device):
    """Wall time of one fn() call, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(fns, device, warmup, repeats):
    """Median time of each named function, timed round-robin so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def prepare(nets, args, device):
    """The networks in --dtype with the speed options applied, and the dtype they really compute in."""
    dtype = args.dtype
    if dtype == "fp16" and device.type != "cuda":
        print(f"--dtype fp16 is ADM's float16 conversion, which needs CUDA: timing float32 on {device.type}")
        dtype = "float32"
    if dtype == "fp16":
        for net in nets:
            net.convert_to_fp16()
    return [speed_up(net, "bf16" if dtype == "bf16" else "", args.channels_last, args.compile) for net in nets], dtype


def count_flops(fn):
    """FLOPs of one fn() call: matrix products, convolutions and attention, forward and backward."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device, dtype, n=8192, repeats=10):
    """The device's measured matrix-multiply rate in FLOP/s: the median time of an n x n product in dtype."""
    a, b = (torch.randn(n, n, device=device, dtype=_DTYPES[dtype]) for _ in range(2))
    return 2 * n**3 / interleaved_medians({"matmul": lambda: a @ b}, device, 3, repeats)["matmul"]


def guidance(classifier, scale, objectives, x):
    """The guidance function timed: the classifier's, plus objectives - 1 pulls of x towards a known image."""
    known = torch.zeros_like(x)
    pulls = {f"known{k}": (lambda x_in, t, **_: known - x_in) for k in range(1, objectives)}
    cls = classifier_guidance(classifier, scale)
    return pxp.named_guidance(cls=cls, **pulls) if pulls else cls


def time_modes(args):
    """The timings: rows of (mode, seconds per guided step, seconds of the fused combination alone, of the
    general one), the dtype timed, the FLOPs of one step and, on CUDA, the matmul rate in that dtype."""
    device = torch.device(args.device)
    model, classifier, flags = build_networks(args.arch, device)
    size = flags["image_size"]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch_size, 3, size, size, generator=gen).to(device)
    noise = torch.randn(x.shape, generator=gen).to(device)
    kwargs = {"y": torch.randint(0, flags["num_classes"], (args.batch_size,), generator=gen).to(device)}
    t = torch.full((args.batch_size,), args.timestep, device=device)
    base, den, div, *objectives = (torch.randn(x.shape, generator=gen).to(device) for _ in range(3 + args.objectives))
    directions = pxp.Directions(base, den, {f"g{k}": g for k, g in enumerate(objectives)}, div)
    modes = args.modes.split(",")
    configs = {mode: pxp.PxPConfig(mode=mode) for mode in modes}
    diffusion = create_diffusion(**dict({k: flags[k] for k in diffusion_defaults()}, timestep_respacing=args.timestep_respacing))

    def step(config, model, classifier):
        with torch.no_grad():
            cond_fn = guidance(classifier, args.classifier_scale, args.objectives, x)
            diffusion.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs=kwargs, noise=noise, pxp=config)

    # counted in float32 and eager (the same FLOPs); the classifier gets a view of its input, not the leaf
    # itself: FlopCounterMode's module hooks break autograd.grad on leaves (pytorch/pytorch#131753)
    flops = count_flops(lambda: step(configs[modes[0]], model, lambda x_in, t: classifier(x_in.view_as(x_in), t)))
    (model, classifier), dtype = prepare([model, classifier], args, device)
    steps = interleaved_medians({m: (lambda c=c: step(c, model, classifier)) for m, c in configs.items()}, device, args.warmup, args.repeats)
    combiners = {f"{kind} {m}": (lambda c=c, f=f: f(directions.base, directions.named(), c)) for m, c in configs.items()
                 for kind, f in (("fused", pxp.combine_fused), ("general", pxp.combine_general))}
    combines = interleaved_medians(combiners, device, args.warmup, max(args.repeats, 20))
    rows = [(m, steps[m], combines[f"fused {m}"], combines[f"general {m}"]) for m in modes]
    return dict(rows=rows, dtype=dtype, flops=flops, peak=matmul_rate(device, dtype) if device.type == "cuda" else None)


def format_table(args, timings):
    """A Markdown table of the timings, with the achieved FLOP rate and the PxP overhead against mode none."""
    rows, flops, peak = timings["rows"], timings["flops"], timings["peak"]
    base = dict((mode, s) for mode, s, *_ in rows).get("none")
    options = "".join([", channels_last" if args.channels_last else "", ", compiled" if args.compile else ""])
    title = (
        f"arch {args.arch}, batch {args.batch_size}, {args.device}, {timings['dtype']}{options}, t={args.timestep} of "
        f"{args.timestep_respacing}, median of {args.repeats}; {args.objectives} guidance objective(s); "
        f"{flops / 1e9:.2f} GFLOP per step (UNet + classifier forward/backward)"
    )
    if peak:
        title += f"; {timings['dtype']} matmul rate {peak / 1e12:.1f} TFLOP/s"
    lines = [
        title,
        "",
        "| pxp_mode | ms/step | images/s | TFLOP/s |" + (" % of matmul rate |" if peak else "")
        + " vs none | combine alone (ms, % of step) | general combiner (ms) |",
        "| --- | ---: | ---: | ---: |" + (" ---: |" if peak else "") + " ---: | ---: | ---: |",
    ]
    for mode, step_s, fused_s, general_s in rows:
        overhead = f"{100 * (step_s / base - 1):+.1f}%" if base and mode != "none" else ""
        fraction = f" {100 * flops / step_s / peak:.1f}% |" if peak else ""
        lines.append(
            f"| {mode} | {1000 * step_s:.1f} | {args.batch_size / step_s:.2f} | {flops / step_s / 1e12:.3g} |{fraction} {overhead} | "
            f"{1000 * fused_s:.3f} ({100 * fused_s / step_s:.2f}%) | {1000 * general_s:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="64", choices=["quick", "64", "128", "256"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--modes", default="none,cls_den,cls_den_div,cls_den_div2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="bf16: autocast; fp16: ADM's conversion (CUDA)")
    parser.add_argument("--channels_last", type=str2bool, default=False)
    parser.add_argument("--compile", type=str2bool, default=False, help="torch.compile the UNet and the classifier")
    parser.add_argument("--timestep_respacing", default="250")
    parser.add_argument("--timestep", type=int, default=125, help="respaced index of the timed step")
    parser.add_argument("--classifier_scale", type=float, default=1.0)
    parser.add_argument("--objectives", type=int, default=1, help="guidance objectives: the classifier, then known-pixel pulls")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    table = format_table(args, time_modes(args))
    print(table)
    return table


if __name__ == "__main__":
    main()
