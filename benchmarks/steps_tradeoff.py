"""How many network calls does guided sampling need? FID against calls, on the digits models.

Each digits model is guided by the noisy classifier with ADM-G and with the best PixelAsParam
setting of guidance_tradeoff.py, each at the scale where it reaches the model's target accuracy
(0.9 unconditional, 0.99 conditional; read off benchmarks/results/guidance_tradeoff_*.md), and
sampled by DDPM (25 to 1000 network calls), DDIM and DPM-Solver++ 2M and 2M SDE (5 to 50 calls).
The reference is ADM-G's 1000-step DDPM. The DPM-Solver++ points at 20 calls or fewer are also
sampled at bracketing scales, so that their FID at the reference's accuracy can be interpolated.
Every point samples --num_samples digits per seed (labels 0-9 in turn; x_T and the step noises
from the seed) and is scored by evaluations/digits_features.score: accuracy on the target labels,
FID, precision and recall against the held-out digits, mean and 95% interval over seeds.

    nice -n 10 python benchmarks/steps_tradeoff.py --models unconditional --out benchmarks/results/steps_tradeoff_unconditional
    python benchmarks/steps_tradeoff.py --quick        # a smoke test

The points run in the order of `plan` (the reference first); `<out>.json` is rewritten after
each, and a run started again skips the points it holds (it must sample as many digits a point;
--models, --settings, --samplers, --calls and --seeds only choose which points run, so a narrower
run can first give the headline points every seed). At the end it
writes `<out>.md` (tables) and `<out>.png` (FID and accuracy against network calls).
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

from evaluations.digits_features import held_out_reference, score  # noqa: E402
from guidance_tradeoff import fid_at_accuracy, fmt, grouped, mean_ci  # noqa: E402
from guided_diffusion.checkpoints import load_with_sidecar  # noqa: E402
from guided_diffusion.dpm_solver import DEFAULT_THRESHOLD  # noqa: E402
from guided_diffusion.pixel_as_param import PxPConfig  # noqa: E402
from guided_diffusion.sampling_networks import classifier_guidance, label_aware  # noqa: E402
from guided_diffusion.script_util import create_diffusion, diffusion_defaults, str2bool  # noqa: E402

NOISY_HALF = (0.5, 1.0)
DPMPP = ("dpmpp_2m", "dpmpp_2m_sde")
FAST_CALLS = (5, 10, 15, 20, 25, 50)
DDPM_CALLS = (25, 50, 100, 250, 1000)
BRACKETED_CALLS = 20  # DPM-Solver++ points at this many calls or fewer are sampled at every scale of their setting
TARGET_RATIO = 1.1  # the target: within 10% of the reference's FID


@dataclass(frozen=True)
class Setting:
    """A way of guiding at its scales: the first reaches the model's target accuracy with DDPM, the others bracket it."""

    name: str
    pxp: PxPConfig
    scales: tuple
    ddpm_calls: tuple = DDPM_CALLS  # the DDPM points sampled
    ddim: bool = True  # whether DDIM is sampled


# model: checkpoint, target accuracy, (ADM-G, the best PixelAsParam setting of guidance_tradeoff's README)
MODELS = {
    "conditional": (
        "digits_cond.pt",
        0.99,
        (
            Setting("ADM-G", PxPConfig(), (0.6, 0.3, 1.2)),
            Setting("cls_den t>=T/2 only", PxPConfig(mode="cls_den", window=NOISY_HALF), (0.6, 0.3, 1.2), (25, 50, 100), ddim=False),
        ),
    ),
    "unconditional": (
        "digits_uncond.pt",
        0.9,
        (
            Setting("ADM-G", PxPConfig(), (1.5, 1.0, 2.5)),
            Setting("cls_den_div2 t>=T/2 only", PxPConfig(mode="cls_den_div2", window=NOISY_HALF), (0.5, 0.3, 1.0), (25, 50, 100), ddim=False),
        ),
    ),
}


def plan(settings, bracket=True):
    """The points (setting, sampler, calls, scale) in the order they are sampled: the reference (ADM-G,
    DDPM, 1000 calls) first, then setting by setting the fast samplers (at <= BRACKETED_CALLS at every
    scale, with bracket), DDPM and DDIM."""
    reference = settings[0]
    yield reference, "ddpm", 1000, reference.scales[0]
    for setting in settings:
        for sampler in DPMPP:
            for calls in FAST_CALLS:
                scales = setting.scales if bracket and calls <= BRACKETED_CALLS else setting.scales[:1]
                yield from ((setting, sampler, calls, scale) for scale in scales)
        yield from ((setting, "ddpm", calls, setting.scales[0]) for calls in setting.ddpm_calls if (setting, calls) != (reference, 1000))
        if setting.ddim:
            yield from ((setting, "ddim", calls, setting.scales[0]) for calls in FAST_CALLS)


class Model:
    """A digits model and the noisy classifier, with its diffusion respaced to any number of calls."""

    def __init__(self, model_file):
        model, self.flags = load_with_sidecar(ROOT / "models" / model_file)
        self.classifier, _ = load_with_sidecar(ROOT / "models" / "digits_classifier.pt")
        self.model_fn = label_aware(model, self.flags["class_cond"])
        self.shape = (3, self.flags["image_size"], self.flags["image_size"])

    def sample(self, sampler, calls, threshold, setting, scale, labels, seed):
        """uint8 NHWC digits guided towards labels; x_T and the step noises drawn from the seed."""
        diffusion = create_diffusion(**dict({k: self.flags[k] for k in diffusion_defaults()}, timestep_respacing=str(calls)))
        gen = torch.Generator().manual_seed(seed)
        x_T = torch.randn(len(labels), *self.shape, generator=gen)
        steps = diffusion.sample_loop_progressive(
            sampler, self.model_fn, x_T.shape, x0_threshold=threshold, noise=x_T, model_kwargs={"y": labels}, device=x_T.device,
            cond_fn=classifier_guidance(self.classifier, scale) if scale else None, pxp=setting.pxp,
            step_noise=lambda i: torch.randn(x_T.shape, generator=gen),
        )
        for out in steps:
            pass
        return ((out["sample"] + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def key(row):
    """What identifies a point."""
    return tuple(row[k] for k in ("model", "setting", "sampler", "calls", "threshold", "scale", "seed"))


def run(args, rows, save):
    """Sample and score every planned point not in rows (appending to rows, calling save() after each)."""
    evaluator, reference, baseline = held_out_reference()
    labels = torch.arange(args.num_samples) % 10
    done = {key(r) for r in rows}
    models = {name: Model(MODELS[name][0]) for name in args.models}
    for seed in range(args.seeds):  # seed-major: a run stopped early has every point at its first seeds
        for model_name, model in models.items():
            for setting, sampler, calls, scale in plan(MODELS[model_name][2], args.bracket):
                if (args.settings and setting.name not in args.settings) or (args.samplers and sampler not in args.samplers) or (args.calls and calls not in args.calls):
                    continue
                for threshold in args.thresholds if sampler in DPMPP else [""]:
                    row = dict(model=model_name, setting=setting.name, sampler=sampler, calls=calls, threshold=threshold, scale=scale, seed=seed)
                    if key(row) in done:
                        continue
                    started = time.time()
                    images = model.sample(sampler, calls, threshold or DEFAULT_THRESHOLD, setting, scale, labels, seed)
                    row.update(seconds=time.time() - started, **score(evaluator, reference, images, labels))
                    rows.append(row)
                    save(baseline)
                    print(f"{model_name:13s} {setting.name[:22]:22s} {sampler:12s} {calls:4d} calls {threshold:7s} scale {scale:<4g} seed {seed} "
                          f"acc {row['accuracy']:.3f} FID {row['fid']:7.2f} P {row['precision']:.3f} R {row['recall']:.3f} {row['seconds']:6.1f} s", flush=True)
    return baseline


def main_scale(model, setting):
    """The scale of a setting at which DDPM reaches the model's target accuracy."""
    return next(s.scales[0] for s in MODELS[model][2] if s.name == setting)


def reference_rows(rows, model):
    """The reference's points of a model, by seed: ADM-G's DDPM at its main scale and the most calls sampled (1000 as planned)."""
    ddpm = [r for r in rows if r["model"] == model and r["setting"] == "ADM-G" and r["sampler"] == "ddpm" and r["scale"] == main_scale(model, "ADM-G")]
    most = max((r["calls"] for r in ddpm), default=None)
    return {r["seed"]: r for r in ddpm if r["calls"] == most}


def against_reference(points, ref):
    """A fast point's scale curve against the reference, over the seeds both have (the same x_T):
    (seeds, reference (accuracy, FID), FID where the seed-mean curve reaches the reference's accuracy
    (None if it does not), and the lowest FID at a scale whose accuracy is at least the reference's
    as (FID, scale), or None)."""
    by_scale = grouped(points, "scale")
    seeds = sorted(set(ref).intersection(*({p["seed"] for p in ps} for ps in by_scale.values())))
    if not seeds:
        return seeds, None, None, None
    ref_point = tuple(np.mean([ref[s][k] for s in seeds]) for k in ("accuracy", "fid"))
    curve = sorted((scale, *(np.mean([p[k] for p in ps if p["seed"] in seeds]) for k in ("accuracy", "fid"))) for (scale,), ps in by_scale.items())
    at_accuracy = fid_at_accuracy([(acc, fid) for _, acc, fid in curve], ref_point[0])
    above = [(fid, scale) for scale, acc, fid in curve if acc >= ref_point[0]]
    return seeds, ref_point, at_accuracy, min(above) if above else None


def markdown(rows, baseline, args):
    """The tables: every point at its setting's main scale, and the fast points at the reference's accuracy."""
    lines = [
        f"{args.num_samples} samples a point, up to {args.seeds} seeds (the seeds column: how many; mean ± 95% t-interval over them); x0_threshold "
        f"{', '.join(t or '-' for t in args.thresholds)} for the DPM-Solver++ samplers.",
        f"For scale: the real train-split digits score accuracy {baseline['accuracy']:.3f}, FID {baseline['fid']:.2f}, "
        f"precision {baseline['precision']:.3f}, recall {baseline['recall']:.3f} against the same held-out digits.",
        "",
    ]
    for (model,), model_rows in grouped(rows, "model").items():
        ref = reference_rows(model_rows, model)
        ref_fid = mean_ci([r["fid"] for r in ref.values()])[0] if ref else float("nan")
        ref_acc = mean_ci([r["accuracy"] for r in ref.values()])[0] if ref else float("nan")
        lines += [f"### {model} model", ""]
        if ref:
            lines += [f"Reference: ADM-G, DDPM, {next(iter(ref.values()))['calls']} calls, scale {main_scale(model, 'ADM-G'):g}: accuracy {fmt([r['accuracy'] for r in ref.values()], 3)}, "
                      f"FID {fmt([r['fid'] for r in ref.values()], 2)}; the target is FID <= {TARGET_RATIO * ref_fid:.2f} at accuracy {ref_acc:.3f}.", ""]
        lines += ["| setting | sampler | x0_threshold | calls | scale | seeds | accuracy | FID | FID / reference (same seeds) | precision | recall | s/point |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        main = [r for r in model_rows if r["scale"] == main_scale(model, r["setting"])]
        for (setting, sampler, threshold, calls), points in sorted(grouped(main, "setting", "sampler", "threshold", "calls").items(), key=_order):
            get = lambda k: [p[k] for p in points]  # noqa: E731
            paired = [p for p in points if p["seed"] in ref]  # against the reference's runs of the same seeds
            ratio = f"{np.mean([p['fid'] for p in paired]) / np.mean([ref[p['seed']]['fid'] for p in paired]):.2f}" if paired else "-"
            lines.append(
                f"| {setting} | {sampler} | {threshold or '-'} | {calls} | {points[0]['scale']:g} | {len(points)} | {fmt(get('accuracy'), 3)} | {fmt(get('fid'), 2)} | "
                f"{ratio} | {fmt(get('precision'), 3)} | {fmt(get('recall'), 3)} | {np.mean(get('seconds')):.1f} |"
            )
        bracketed = [r for r in model_rows if r["sampler"] in DPMPP and r["calls"] <= BRACKETED_CALLS]
        if ref and bracketed:
            lines += ["", f"Against the reference at its accuracy, over the seeds both have (seed-mean curves over scales; the target: "
                      f"FID <= {TARGET_RATIO:g} x the reference's at equal or higher accuracy):", "",
                      "| setting | sampler | x0_threshold | calls | scales | seeds | reference (accuracy, FID) | FID at its accuracy (ratio) "
                      "| lowest FID at higher accuracy (scale, ratio) | target met |",
                      "| --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- |"]
            for (setting, sampler, threshold, calls), points in sorted(grouped(bracketed, "setting", "sampler", "threshold", "calls").items(), key=_order):
                seeds, ref_point, at_accuracy, above = against_reference(points, ref)
                if not seeds:
                    continue
                ratios = [f / ref_point[1] for f in (at_accuracy, above and above[0]) if f is not None]
                lines.append(
                    f"| {setting} | {sampler} | {threshold or '-'} | {calls} | {', '.join(f'{s:g}' for s in sorted({p['scale'] for p in points}))} | "
                    f"{len(seeds)} | {ref_point[0]:.3f}, {ref_point[1]:.2f} | "
                    f"{'not reached' if at_accuracy is None else f'{at_accuracy:.2f} ({at_accuracy / ref_point[1]:.2f})'} | "
                    f"{'none' if above is None else f'{above[0]:.2f} ({above[1]:g}, {above[0] / ref_point[1]:.2f})'} | "
                    f"{'yes' if ratios and min(ratios) <= TARGET_RATIO else 'no'} |"
                )
        lines.append("")
    return "\n".join(lines)


def _order(item):
    """Table order: setting as planned, then sampler, threshold and calls."""
    (setting, sampler, threshold, calls), _ = item
    samplers = ("ddpm", "ddim", *DPMPP)
    return (setting != "ADM-G", setting, samplers.index(sampler), threshold, calls)


def plot(rows, path):
    """FID and accuracy against network calls (main scales), one curve per setting and sampler, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(grouped(rows, "model"))
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False, sharex=True)
    for column, (model,) in enumerate(models):
        main = [r for r in rows if r["model"] == model and r["scale"] == main_scale(model, r["setting"])]
        ref = reference_rows(rows, model)
        for (setting, sampler, threshold), points in grouped(main, "setting", "sampler", "threshold").items():
            by_calls = sorted(grouped(points, "calls").items())
            calls = [c for (c,), _ in by_calls]
            style = "-o" if setting == "ADM-G" else "--s"
            label = f"{setting}, {sampler}" + (f" ({threshold})" if threshold and threshold != DEFAULT_THRESHOLD else "")
            for row, metric in enumerate(("fid", "accuracy")):
                axes[row][column].plot(calls, [np.mean([p[metric] for p in ps]) for _, ps in by_calls], style, label=label, markersize=4)
        if ref:
            ref_fid = np.mean([r["fid"] for r in ref.values()])
            axes[0][column].axhline(ref_fid, color="black", lw=0.8, label=f"reference: ADM-G, DDPM {next(iter(ref.values()))['calls']}")
            axes[0][column].axhline(TARGET_RATIO * ref_fid, color="black", lw=0.8, ls=":", label=f"{TARGET_RATIO:g} x reference")
            axes[1][column].axhline(np.mean([r["accuracy"] for r in ref.values()]), color="black", lw=0.8)
        axes[0][column].set(yscale="log", ylabel="FID (digits-evaluator features; log scale)", title=f"{model} digits model")
        axes[1][column].set(xscale="log", xlabel="network calls (sampling steps)", ylabel="accuracy on the target label")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
        axes[0][column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Parse flags, run (or continue) the sweep and write the tables, plot and raw numbers."""
    csv = lambda kind: lambda s: [kind(x) for x in s.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="conditional,unconditional", type=csv(str))
    parser.add_argument("--settings", default="", type=csv(str), help="setting names to keep (default: all)")
    parser.add_argument("--samplers", default="", type=csv(str), help="samplers to keep (default: all)")
    parser.add_argument("--calls", default="", type=csv(int), help="call counts to keep (default: all planned)")
    parser.add_argument("--thresholds", default=DEFAULT_THRESHOLD, type=csv(str), help="x0_threshold values of the DPM-Solver++ points")
    parser.add_argument("--bracket", default=True, type=str2bool, help="sample the fast points at the bracketing scales too")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "steps_tradeoff"))
    parser.add_argument("--quick", action="store_true", help="a smoke test: 10 samples, one seed, the conditional model with ADM-G, DDPM and dpmpp_2m at 5 and 25 calls")
    parser.add_argument("--render", action="store_true", help="rewrite the table and plot from <out>.json, sampling nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.settings, args.num_samples, args.seeds = ["conditional"], ["ADM-G"], 10, 1
        args.samplers, args.calls = args.samplers or ["ddpm", "dpmpp_2m"], args.calls or [5, 25]
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = {k: v for k, v in vars(args).items() if k not in ("out", "render", "threads")}
    rows, baseline = [], None
    if os.path.exists(f"{args.out}.json"):
        with open(f"{args.out}.json") as f:
            saved = json.load(f)
        if saved["flags"]["num_samples"] != flags["num_samples"] and not args.render:
            parser.error(f"{args.out}.json holds points of {saved['flags']['num_samples']} samples: use --num_samples {saved['flags']['num_samples']} or another --out")
        rows, baseline = saved["rows"], saved["baseline"]
        flags = saved["flags"] if args.render else flags
        print(f"{len(rows)} points read from {args.out}.json")
    elif args.render:
        parser.error(f"--render: there is no {args.out}.json")
    started = time.time()
    if not args.render:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

        def save(baseline):
            with open(f"{args.out}.json.tmp", "w") as f:
                json.dump(dict(flags=flags, baseline=baseline, rows=rows), f, indent=1)
            os.replace(f"{args.out}.json.tmp", f"{args.out}.json")

        baseline = run(args, rows, save)
    shown = argparse.Namespace(**flags)
    with open(f"{args.out}.md", "w") as f:
        f.write(markdown(rows, baseline, shown))
    plot(rows, f"{args.out}.png")
    print(f"{len(rows)} points in {time.time() - started:.0f} s: {args.out}.md, .png, .json")
    return rows


if __name__ == "__main__":
    main()
