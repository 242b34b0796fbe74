"""Two guidance objectives at once: class-guided inpainting of the digits, summed against projected.

Sample i keeps the left half (4 of 8 columns) of held-out digit j = i mod 360 and is steered to a
target class other than that digit's own: (label_j + 1 + (j + i // 360) mod 9) mod 10, so every
digit meets several targets. The unconditional digits model is guided by two objectives:

- cls: the noisy classifier's d/dx log p(target | x_t), times the classifier scale (ADM-G's);
- known: d/dx log q(x_t[m] | x0[m] = known) = m * (sqrt(a_t) known - x_t) / (1 - a_t), the
  forward process's likelihood of the known pixels (m: the mask of the left half, a_t: alpha_bar
  at t), times a weight w. It needs no network: reconstruction guidance through x0_hat(x_t) would
  backpropagate through the diffusion model at every step, about three times the cost here. At
  w = 1 a DDPM step moves the known pixels most of the way to the known digit's noised values.

Summed, a guidance function returns cls + known: ADM-G's plain step, or PixelAsParam with that one
direction (`cls_den_div2`, the unconditional model's recipe, and its bounded form `--pxp_bound 1`).
Projected, it returns {cls, known} (`pixel_as_param.named_guidance`): PCGrad between the two, then
each projected against den and div as the mode says. (With mode none the two are summed, so
ADM-G has no projected form.) The known weight w sets the trade-off between the two objectives,
so it is swept (the class scale is fixed) and each setting draws a curve: the comparison is at
equal known-half error, not at equal w. Every setting sees the same x_T and step noises for a seed. A point
reports the evaluator's accuracy on the target classes, the mean squared error of the known half
(pixels in [0, 1], the sample's left half against the digit's), and FID / precision / recall in
the evaluator's features against the 1,437 train digits (not the held-out ones the known halves
come from), as mean and 95% interval over seeds. "Inpainting only" (known alone, ADM-G) is the
reference for what the class guidance costs.

    python benchmarks/multi_objective.py                 # the README's table (about 50 minutes on 2 busy cores)
    python benchmarks/multi_objective.py --quick         # a smoke test

It writes `<out>.json` (every seed's numbers, rewritten after each point), then `<out>.md` (the
table) and `<out>.png` (accuracy against known-half error and against FID, one curve per setting).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluations.digits_features import score  # noqa: E402
from guidance_tradeoff import Sampler, fmt, grouped  # noqa: E402
from evaluations.digits_features import load_evaluator  # noqa: E402
from evaluations.metrics import compute_statistics  # noqa: E402
from guided_diffusion.digits import digits_split  # noqa: E402
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule  # noqa: E402
from guided_diffusion.pixel_as_param import PxPConfig, named_guidance  # noqa: E402
from guided_diffusion.sampling_networks import classifier_guidance  # noqa: E402

KNOWN_COLUMNS = 4  # the left half of an 8x8 digit


@dataclass(frozen=True)
class Setting:
    """A way of combining the objectives: the PixelAsParam config and whether the guidance function returns them named."""

    name: str
    pxp: PxPConfig = PxPConfig()
    projected: bool = False  # {cls, known} as two directions, else their sum as one
    classes: bool = True  # False: the known pixels alone (no class guidance)


SETTINGS = (
    Setting("inpainting only (ADM-G)", classes=False),
    Setting("ADM-G summed"),
    Setting("cls_den_div2 summed", PxPConfig(mode="cls_den_div2")),
    Setting("cls_den_div2 projected", PxPConfig(mode="cls_den_div2"), projected=True),
    Setting("cls_den_div2 bound 1 summed", PxPConfig(mode="cls_den_div2", bound=1.0)),
    Setting("cls_den_div2 bound 1 projected", PxPConfig(mode="cls_den_div2", bound=1.0), projected=True),
)


def inpainting_task(num_samples):
    """(known digits as [N, 3, 8, 8] in [-1, 1], the mask of their known pixels, target classes [N], their own classes [N])."""
    images, labels, _ = digits_split()["held_out"]
    i = np.arange(num_samples)
    j = i % len(labels)
    targets = (labels[j] + 1 + (j + i // len(labels)) % 9) % 10
    known = torch.from_numpy(images[j]).permute(0, 3, 1, 2).float() / 127.5 - 1
    mask = torch.zeros_like(known)
    mask[..., :KNOWN_COLUMNS] = 1
    return known, mask, torch.from_numpy(targets), torch.from_numpy(labels[j])


def known_pixels_guidance(known, mask, alphas_cumprod, weight=1.0):
    """cond_fn: weight times the gradient of log q(x_t[mask] | x0[mask] = known), m * (sqrt(a_t) known - x_t) / (1 - a_t)."""
    alphas_cumprod = torch.from_numpy(alphas_cumprod).float()

    def cond_fn(x, t, **kwargs):
        a = alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return weight * mask * (a.sqrt() * known - x) / (1 - a)

    return cond_fn


def guidance_for(setting, class_fn, known_fn):
    """The setting's guidance function: known alone, the two summed, or the two named."""
    if not setting.classes:
        return known_fn
    if setting.projected:
        return named_guidance(cls=class_fn, known=known_fn)
    return lambda x, t, **kwargs: class_fn(x, t, **kwargs) + known_fn(x, t, **kwargs)


def known_mse(images, known, mask):
    """Mean squared error over the known pixels, pixels in [0, 1]: uint8 NHWC samples against the known NCHW digits."""
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    target = (known + 1) / 2
    return float(((samples - target) ** 2 * mask).sum() / mask.sum())


def run(args, save):
    """Every (known weight, setting, seed) point as a dict, in that order; save(rows) after each point."""
    evaluator = load_evaluator()
    train_images, _, _ = digits_split()["train"]
    features = evaluator(train_images)[0]
    mu, sigma = compute_statistics(features)
    reference = dict(features=features, mu=mu, sigma=sigma)
    sampler = Sampler("digits_uncond.pt", args.steps)
    schedule = get_named_beta_schedule(sampler.flags["noise_schedule"], sampler.flags["diffusion_steps"])
    known, mask, targets, _ = inpainting_task(args.num_samples)
    alphas_cumprod = np.cumprod(1.0 - schedule)
    rows = []
    for weight in args.known_weights:
        known_fn = known_pixels_guidance(known, mask, alphas_cumprod, weight)
        for setting in [s for s in SETTINGS if not args.settings or s.name in args.settings]:
            cond_fn = guidance_for(setting, classifier_guidance(sampler.classifier, args.scale), known_fn)
            for seed in range(args.seeds):
                gen = torch.Generator().manual_seed(seed)
                x_T = torch.randn(args.num_samples, *sampler.shape, generator=gen)
                step_noises = [torch.randn(x_T.shape, generator=gen) for _ in range(args.steps)]
                started = time.time()
                images = sampler.sample(setting.pxp, cond_fn, targets, x_T, step_noises)
                result = dict(score(evaluator, reference, images, targets), known_mse=known_mse(images, known, mask))
                rows.append(dict(setting=setting.name, known_weight=weight, seed=seed, seconds=time.time() - started, **result))
                save(rows)
                print(f"w {weight:<4g} {setting.name:32s} seed {seed} acc {result['accuracy']:.3f} "
                      f"MSE {result['known_mse']:.4f} FID {result['fid']:7.2f} {rows[-1]['seconds']:5.1f} s", flush=True)
    return rows


def markdown(rows, args):
    """The table: every setting at every known weight."""
    lines = [
        f"{args.num_samples} samples a point, {args.seeds} seeds (mean ± 95% CI over seeds), {args.steps} sampling steps, "
        f"unconditional digits model, classifier scale {args.scale:g}; known pixels: the left half of a held-out digit; "
        "target: another class.",
        "",
        "| known weight | setting | target accuracy | known-half MSE | FID (vs train digits) | precision | recall | s/point |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (weight, setting), points in grouped(sorted(rows, key=lambda r: r["known_weight"]), "known_weight", "setting").items():
        get = lambda k: [p[k] for p in points]  # noqa: E731
        lines.append(
            f"| {weight:g} | {setting} | {fmt(get('accuracy'), 3)} | {fmt(get('known_mse'), 4)} | {fmt(get('fid'), 2)} | "
            f"{fmt(get('precision'), 3)} | {fmt(get('recall'), 3)} | {np.mean(get('seconds')):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Target accuracy against known-half MSE and against FID, one curve per setting over the known weights (means over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for (setting,), points in grouped(rows, "setting").items():
        by_weight = sorted(grouped(points, "known_weight").items())
        mean = lambda key: [np.mean([p[key] for p in ps]) for _, ps in by_weight]  # noqa: E731
        style = "--o" if "projected" in setting else "-o"
        for ax, key in zip(axes, ("known_mse", "fid")):
            ax.plot(mean(key), mean("accuracy"), style, label=setting, markersize=4)
    for ax, label in zip(axes, ("known-half MSE (pixels in [0, 1]; log scale): lower is better", "FID vs the train digits (log scale): lower is better")):
        ax.set(xscale="log", xlabel=label, ylabel="accuracy on the target class")
        ax.grid(alpha=0.3)
    axes[0].set_title("known weight falling along each curve: accuracy rises, the known half drifts")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Parse flags, run the benchmark and write the table and raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=2.0, help="the classifier scale")
    parser.add_argument("--known_weights", default="0.1,0.3,1", type=lambda s: [float(x) for x in s.split(",")], help="weights w of the known-pixels objective")
    parser.add_argument("--settings", default="", type=lambda s: [x for x in s.split(",") if x], help="names to keep (default: all)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="respaced sampling steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multi_objective"))
    parser.add_argument("--quick", action="store_true", help="a smoke test: 20 samples, 5 steps, one known weight, one seed")
    parser.add_argument("--render", action="store_true", help="rewrite the table and plot from <out>.json (e.g. of a run stopped early), sampling nothing")
    args = parser.parse_args(argv)
    if args.render:
        with open(f"{args.out}.json") as f:
            saved = json.load(f)
        rows, args = saved["rows"], argparse.Namespace(**dict(saved["flags"], out=args.out))
        with open(f"{args.out}.md", "w") as f:
            f.write(markdown(rows, args))
        plot(rows, f"{args.out}.png")
        return rows
    if args.quick:
        args.num_samples, args.seeds, args.steps, args.known_weights = 20, 1, 5, [1.0]
    started = time.time()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save(rows):
        with open(f"{args.out}.json.tmp", "w") as f:
            json.dump(dict(flags=vars(args), rows=rows), f, indent=1)
        os.replace(f"{args.out}.json.tmp", f"{args.out}.json")

    rows = run(args, save)
    with open(f"{args.out}.md", "w") as f:
        f.write(markdown(rows, args))
    plot(rows, f"{args.out}.png")
    print(f"{len(rows)} points in {time.time() - started:.0f} s: {args.out}.md, .png, .json")
    return rows


if __name__ == "__main__":
    main()
