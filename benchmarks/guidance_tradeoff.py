"""Does PixelAsParam trade accuracy for FID better than ADM-G? Measured on the digits models.

For the conditional digits model (the paper's recipe: cls_den) and the unconditional one
(cls_den_div2), sweeps --classifier_scale x guidance setting (ADM-G, the PxP modes, DDPM and
DDIM, one-sided and lighter projections, the optimizer modes, projection in part of the
trajectory, ADM-G guided in part of the trajectory, the bounded projection). Every point samples --num_samples digits per seed, labels 0-9 in turn, and every
setting sees the same x_T and step noises for a seed (common random numbers). Each point
reports the evaluator's accuracy on the target labels and FID / precision / recall in its
feature space against the held-out digits, as mean and 95% confidence interval over seeds.

    python benchmarks/guidance_tradeoff.py                 # the README's numbers (about an hour: run the two models in parallel, one per core)
    python benchmarks/guidance_tradeoff.py --quick         # a smoke test

It writes `<out>.json` (every seed's numbers, rewritten after each point: it runs setting by
setting, so a run stopped early keeps whole settings), then `<out>.md` (tables: equal accuracy;
equal scale, every point) and `<out>.png` (accuracy against FID, one curve per setting).
`--render a.json,b.json --out X` merges runs of one protocol into X.md and X.png.
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
from scipy import stats as scipy_stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluations.digits_features import held_out_reference, score  # noqa: E402
from guided_diffusion.checkpoints import load_with_sidecar  # noqa: E402
from guided_diffusion.pixel_as_param import PxPConfig  # noqa: E402
from guided_diffusion.sampling_networks import classifier_guidance, label_aware  # noqa: E402
from guided_diffusion.script_util import create_diffusion, diffusion_defaults  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One way of guiding: the PixelAsParam settings (mode, weights, optimizer, windows, bound) and the sampler."""

    name: str
    pxp: PxPConfig = PxPConfig()
    ddim: bool = False


BOUNDS = (0.5, 1.0, 2.0, 4.0)  # --pxp_bound KAPPA values swept


def settings_for(recipe):
    """The settings swept for a model whose paper recipe is `recipe` (cls_den or cls_den_div2)."""
    noisy_half = (0.5, 1.0)  # steps with t >= T/2
    base = [
        Setting("ADM-G", PxPConfig()),
        Setting("cls_den", PxPConfig(mode="cls_den")),
        Setting("cls_den_div", PxPConfig(mode="cls_den_div")),
        Setting("cls_den_div2", PxPConfig(mode="cls_den_div2")),
        Setting("ADM-G DDIM", PxPConfig(), ddim=True),
        Setting("cls_den DDIM", PxPConfig(mode="cls_den"), ddim=True),
        Setting("ADM-G guided t>=T/2 only", PxPConfig(guidance_window=noisy_half)),  # the fair baseline of projecting there
    ]
    variants = [
        Setting(f"{recipe} dweight 0", PxPConfig(mode=recipe, dweight=0.0)),
        Setting(f"{recipe} weights 0.5", PxPConfig(mode=recipe, dweight=0.5, cweight=0.5)),
        Setting(f"{recipe} momentum", PxPConfig(mode=recipe, optimizer="momentum")),
        Setting(f"{recipe} adam", PxPConfig(mode=recipe, optimizer="adam")),
        Setting(f"{recipe} t<T/2 only", PxPConfig(mode=recipe, window=(0.0, 0.5))),
        Setting(f"{recipe} t>=T/2 only", PxPConfig(mode=recipe, window=noisy_half)),
        *(Setting(f"{recipe} bound {kappa:g}", PxPConfig(mode=recipe, bound=kappa)) for kappa in BOUNDS),
        Setting(f"{recipe} bound 1 t>=T/2 only", PxPConfig(mode=recipe, bound=1.0, window=noisy_half)),
    ]
    return base + variants


# model: (checkpoint, the paper's recipe, target accuracies of the frontier: between unguided and saturated)
MODELS = {
    "conditional": ("digits_cond.pt", "cls_den", (0.98, 0.99, 0.995)),
    "unconditional": ("digits_uncond.pt", "cls_den_div2", (0.5, 0.7, 0.9, 0.95)),
}


class Sampler:
    """A digits model and the noisy classifier, sampled on one respaced schedule of the model's own diffusion."""

    def __init__(self, model_file, steps):
        self.model, self.flags = load_with_sidecar(ROOT / "models" / model_file)
        self.classifier, _ = load_with_sidecar(ROOT / "models" / "digits_classifier.pt")
        self.model_fn = label_aware(self.model, self.flags["class_cond"])
        self.diffusion = create_diffusion(**dict({k: self.flags[k] for k in diffusion_defaults()}, timestep_respacing=str(steps)))
        self.shape = (3, self.flags["image_size"], self.flags["image_size"])

    def guidance(self, scale):
        """ADM-G's classifier guidance at scale (None at 0)."""
        return classifier_guidance(self.classifier, scale) if scale else None

    def sample(self, pxp, cond_fn, labels, x_T, step_noises, ddim=False):
        """uint8 NHWC digits guided by cond_fn (labels: its y); step_noises[i] is the z of timestep index i."""
        loop = self.diffusion.ddim_sample_loop if ddim else self.diffusion.p_sample_loop
        x = loop(
            self.model_fn, x_T.shape, noise=x_T, cond_fn=cond_fn,
            model_kwargs={"y": labels}, device=x_T.device, step_noise=step_noises.__getitem__, pxp=pxp,
        )
        return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run(args, save):
    """Every (model, setting, scale, seed) point as a dict, setting by setting; save(rows, baseline) after each point.

    Setting-major, so a run stopped early keeps whole settings. Without guidance every setting
    of a sampler (DDPM or DDIM) is the same: its scale-0 point is sampled once and shared.
    """
    evaluator, reference, baseline = held_out_reference()
    labels = torch.arange(args.num_samples) % 10
    rows = []
    for model_name in args.models:
        model_file, recipe, _ = MODELS[model_name]
        sampler = Sampler(model_file, args.steps)
        unguided = {}  # (ddim, seed) -> (result, seconds)
        for setting in [s for s in settings_for(recipe) if not args.settings or s.name in args.settings]:
            for seed in range(args.seeds):
                gen = torch.Generator().manual_seed(seed)
                x_T = torch.randn(args.num_samples, *sampler.shape, generator=gen)
                step_noises = [torch.randn(x_T.shape, generator=gen) for _ in range(args.steps)]
                for scale in args.scales:
                    if scale == 0 and (setting.ddim, seed) in unguided:
                        result, seconds = unguided[setting.ddim, seed]
                    else:
                        started = time.time()
                        images = sampler.sample(setting.pxp, sampler.guidance(scale), labels, x_T, step_noises, setting.ddim)
                        result, seconds = score(evaluator, reference, images, labels), time.time() - started
                        if scale == 0:
                            unguided[setting.ddim, seed] = result, seconds
                    rows.append(dict(model=model_name, setting=setting.name, scale=scale, seed=seed, seconds=seconds, **result))
                    save(rows, baseline)
                    print(f"{model_name:13s} seed {seed} scale {scale:<4g} {setting.name[:24]:24s} "
                          f"acc {result['accuracy']:.3f} FID {result['fid']:7.2f} P {result['precision']:.3f} "
                          f"R {result['recall']:.3f} {seconds:5.1f} s", flush=True)
    return rows, baseline


def merged(paths):
    """(flags, baseline, rows) of several .json files this script wrote with one protocol (samples, seeds, steps).

    A point in more than one file is kept once (the first). A setting run without scale 0 gets
    the unguided points of its model, sampler and seed (every setting shares them). The rows are
    ordered by model, then setting as `settings_for` lists them, then scale and seed.
    """
    saved = []
    for path in paths:
        with open(path) as f:
            saved.append(json.load(f))
    protocol = lambda flags: (flags["num_samples"], flags["seeds"], flags["steps"])  # noqa: E731
    if len({protocol(s["flags"]) for s in saved}) > 1:
        raise SystemExit(f"--render: {', '.join(paths)} were sampled with different --num_samples, --seeds or --steps")
    rows = {}
    for s in saved:
        for row in s["rows"]:
            rows.setdefault((row["model"], row["setting"], row["scale"], row["seed"]), row)
    unguided = {(r["model"], r["setting"].endswith("DDIM"), r["seed"]): r for r in rows.values() if r["scale"] == 0}
    for model, setting, _, seed in list(rows):
        shared = unguided.get((model, setting.endswith("DDIM"), seed))
        if shared:
            rows.setdefault((model, setting, 0.0, seed), dict(shared, setting=setting))
    order = {(m, setting.name): k for m, (_, recipe, _) in MODELS.items() for k, setting in enumerate(settings_for(recipe))}
    models = list(MODELS)
    key = lambda r: (models.index(r["model"]), order.get((r["model"], r["setting"]), len(order)), r["scale"], r["seed"])  # noqa: E731
    return saved[0]["flags"], saved[0]["baseline"], sorted(rows.values(), key=key)


def mean_ci(values):
    """(mean, half-width of the 95% t-interval over seeds; nan with one seed)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def fmt(values, digits):
    """'mean ± ci' of values."""
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def grouped(rows, *keys):
    """rows grouped by the values of keys, in first-seen order."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def fid_at_accuracy(curve, target):
    """FID where a curve of (scale-ordered) (accuracy, FID) points first reaches the target accuracy, or None.

    Linear interpolation between the two points around the crossing.
    """
    for (a0, f0), (a1, f1) in zip(curve, curve[1:]):
        if a0 <= target <= a1 and a1 > a0:
            return f0 + (f1 - f0) * (target - a0) / (a1 - a0)
    return curve[0][1] if curve and curve[0][0] >= target else None


def frontier(rows, targets):
    """{setting: {target: {seed: FID at that accuracy, or None}}} along each seed's scale curve."""
    out = {}
    for (setting, seed), points in grouped(rows, "setting", "seed").items():
        curve = [(p["accuracy"], p["fid"]) for p in sorted(points, key=lambda p: p["scale"])]
        per_target = out.setdefault(setting, {t: {} for t in targets})
        for target in targets:
            per_target[target][seed] = fid_at_accuracy(curve, target)
    return out


def frontier_cell(fids, baseline_fids):
    """'FID ± ci (Δ ± ci)': the Δ to ADM-G is paired by seed (the same noises), so its interval is the tighter one."""
    if None in fids.values():
        return "not reached"
    cell = fmt(list(fids.values()), 2)
    if baseline_fids is None or fids is baseline_fids or None in baseline_fids.values():
        return cell
    mean, half = mean_ci([fids[seed] - baseline_fids[seed] for seed in fids])
    return f"{cell} ({mean:+.2f})" if np.isnan(half) else f"{cell} ({mean:+.2f} ± {half:.2f})"


def markdown(rows, baseline, args):
    """The tables: equal accuracy (the frontier) and equal scale, every point."""
    lines = [
        f"{args.num_samples} samples a point, {args.seeds} seeds (mean ± 95% CI over seeds), {args.steps} sampling steps.",
        f"For scale: the real train-split digits score accuracy {baseline['accuracy']:.3f}, FID {baseline['fid']:.2f}, "
        f"precision {baseline['precision']:.3f}, recall {baseline['recall']:.3f} against the same held-out digits.",
        "",
    ]
    lines += ["### At equal accuracy: FID reached at a target accuracy (interpolated along each setting's scale curve)", ""]
    for (model,), model_rows in grouped(rows, "model").items():
        targets = MODELS[model][2]
        lines += [f"| {model} model: setting | " + " | ".join(f"FID @ acc {t:g} (Δ vs ADM-G)" for t in targets) + " |"]
        lines += ["| --- |" + " ---: |" * len(targets)]
        curves = frontier(model_rows, targets)
        for setting, per_target in curves.items():
            ddim = setting.endswith("DDIM")
            baseline = curves.get("ADM-G DDIM" if ddim else "ADM-G")
            cells = [frontier_cell(per_target[t], baseline and baseline[t]) for t in targets]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### At equal scale (the paper's view)", ""]
    lines += ["| model | setting | scale | accuracy | FID | precision | recall | s/point |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (model, setting, scale), points in grouped(rows, "model", "setting", "scale").items():
        get = lambda k: [p[k] for p in points]  # noqa: E731
        lines.append(
            f"| {model} | {setting} | {scale:g} | {fmt(get('accuracy'), 3)} | {fmt(get('fid'), 2)} | "
            f"{fmt(get('precision'), 3)} | {fmt(get('recall'), 3)} | {np.mean(get('seconds')):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Accuracy against FID, one curve per setting (mean over seeds), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(grouped(rows, "model"))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (model,) in zip(axes[0], models):
        settings = grouped([r for r in rows if r["model"] == model], "setting")
        for color, ((setting,), points) in zip(colors, settings.items()):
            by_scale = grouped(points, "scale")
            fid = [np.mean([p["fid"] for p in ps]) for ps in by_scale.values()]
            acc = [np.mean([p["accuracy"] for p in ps]) for ps in by_scale.values()]
            style = "-o" if setting in ("ADM-G", "cls_den", "cls_den_div", "cls_den_div2") else "--."
            ax.plot(fid, acc, style, color=color, label=setting, markersize=4)
        ax.set_xscale("log")
        ax.set_xlabel("FID (digits-evaluator features, vs held-out digits; log scale): lower is better")
        ax.set_ylabel("accuracy on the target label")
        ax.set_title(f"{model} digits model: classifier scale rising along each curve")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Parse flags, run the sweep and write the table, plot and raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="conditional,unconditional", type=lambda s: s.split(","))
    parser.add_argument("--scales", default="0,1,2,4", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--settings", default="", type=lambda s: [x for x in s.split(",") if x], help="names to keep (default: all)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="respaced sampling steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guidance_tradeoff"))
    parser.add_argument("--quick", action="store_true", help="a smoke test: 40 samples, 5 steps, two scales, one seed")
    parser.add_argument("--render", default="", type=lambda s: [x for x in s.split(",") if x],
                        help="comma list of .json files this script wrote: their points' table and plot to --out, sampling nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.seeds, args.steps, args.scales = 40, 1, 5, [0.0, 2.0]
    started = time.time()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.render:
        flags, baseline, rows = merged(args.render)
        args = argparse.Namespace(**dict(flags, out=args.out))
    else:

        def save(rows, baseline):
            with open(f"{args.out}.json.tmp", "w") as f:
                json.dump(dict(flags=vars(args), baseline=baseline, rows=rows), f, indent=1)
            os.replace(f"{args.out}.json.tmp", f"{args.out}.json")

        rows, baseline = run(args, save)
    with open(f"{args.out}.md", "w") as f:
        f.write(markdown(rows, baseline, args))
    plot(rows, f"{args.out}.png")
    print(f"{len(rows)} points in {time.time() - started:.0f} s: {args.out}.md, .png, .json")
    return rows


if __name__ == "__main__":
    main()
