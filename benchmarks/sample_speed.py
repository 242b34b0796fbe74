"""Time a classifier-guided sampling step (UNet forward + classifier forward/backward + update).

Builds the official architectures from their README flags with seeded random weights (no
download), and reports milliseconds per step and images per second for every --pxp_mode,
with the PixelAsParam overhead relative to plain ADM-G on the same model and inputs.

    python benchmarks/sample_speed.py --arch 64 --batch_size 4 --modes none,cls_den,cls_den_div2
"""

import argparse
import statistics
import time

import torch

from guided_diffusion import pixel_as_param as pxp
from guided_diffusion.checkpoints import DEFAULTS, OFFICIAL, build, parse_flags
from guided_diffusion.script_util import create_gaussian_diffusion

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
    model = build("model", model_flags)
    classifier = build("classifier", parse_flags(classifier_flags, DEFAULTS["classifier"]()))
    for net in (model, classifier):
        for module in net.modules():  # zero-initialised output layers would make whole paths constant
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and not module.weight.any():
                module.reset_parameters()
    return model.to(device).eval(), classifier.to(device).eval(), model_flags


def classifier_guidance(classifier, scale):
    """ADM's cond_fn: scale * grad_x log p(y | x_t, t)."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            return torch.autograd.grad(log_probs[range(len(y)), y].sum(), x_in)[0] * scale

    return cond_fn


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


def time_modes(args):
    """Rows of (mode, seconds per guided step, seconds of the direction combination alone)."""
    device = torch.device(args.device)
    model, classifier, flags = build_networks(args.arch, device)
    size = flags["image_size"]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch_size, 3, size, size, generator=gen).to(device)
    noise = torch.randn(x.shape, generator=gen).to(device)
    kwargs = {"y": torch.randint(0, flags["num_classes"], (args.batch_size,), generator=gen).to(device)}
    t = torch.full((args.batch_size,), args.timestep, device=device)
    cond_fn = classifier_guidance(classifier, args.classifier_scale)
    directions = pxp.Directions(*(torch.randn(x.shape, generator=gen).to(device) for _ in range(4)))
    modes = args.modes.split(",")
    diffusions = {
        mode: create_gaussian_diffusion(
            steps=flags["diffusion_steps"], learn_sigma=flags["learn_sigma"], noise_schedule=flags["noise_schedule"],
            timestep_respacing=args.timestep_respacing, pxp_mode=mode,
        )
        for mode in modes
    }

    def step(diffusion):
        with torch.no_grad():
            diffusion.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs=kwargs, noise=noise)

    steps = interleaved_medians({m: (lambda d=d: step(d)) for m, d in diffusions.items()}, device, args.warmup, args.repeats)
    combines = interleaved_medians(
        {m: (lambda d=d: pxp.combine(directions, d.pxp)) for m, d in diffusions.items()}, device, args.warmup, max(args.repeats, 20)
    )
    return [(mode, steps[mode], combines[mode] if mode != "none" else 0.0) for mode in modes]


def format_table(args, rows):
    """A Markdown table of the timings, with the PxP overhead against mode none."""
    base = dict((mode, s) for mode, s, _ in rows).get("none")
    lines = [
        f"arch {args.arch}, batch {args.batch_size}, {args.device}, float32, t={args.timestep} of {args.timestep_respacing}, median of {args.repeats}",
        "",
        "| pxp_mode | ms/step | images/s | vs none | combine alone (ms, % of step) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, step_s, combine_s in rows:
        overhead = f"{100 * (step_s / base - 1):+.1f}%" if base and mode != "none" else ""
        combine = f"{1000 * combine_s:.3f} ({100 * combine_s / step_s:.2f}%)" if mode != "none" else ""
        lines.append(f"| {mode} | {1000 * step_s:.1f} | {args.batch_size / step_s:.2f} | {overhead} | {combine} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="64", choices=["quick", "64", "128", "256"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--modes", default="none,cls_den,cls_den_div,cls_den_div2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timestep_respacing", default="250")
    parser.add_argument("--timestep", type=int, default=125, help="respaced index of the timed step")
    parser.add_argument("--classifier_scale", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    table = format_table(args, time_modes(args))
    print(table)
    return table


if __name__ == "__main__":
    main()
