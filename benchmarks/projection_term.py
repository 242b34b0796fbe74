"""What cls_den's correction of den adds to a step, measured on the conditional digits model.

`cls_den` replaces den by den + beta * cls with beta = -<den, cls> / ||cls||^2 where they
conflict. The guidance cls is far smaller than den, so beta is large: the step adds
|beta * cls| = ||den|| |cos(den, cls)|, the raw classifier gradient's direction at the size of
den's conflicting part, whatever the guidance scale. This script samples the former embedded
default's 16 digits (conditional model, scale 2, 100 steps, seed 0) with cls_den, records every step's
directions, prints the norms per step, and draws `<out>.png`: the samples, the sum of the
corrections beta * cls over the steps (as an image: its per-channel, high-frequency pattern is
the speckle and the colour), the same digits with ADM-G and with cls_den bounded (--pxp_bound 1),
and the norms against the timestep.

    python benchmarks/projection_term.py        # about 20 s
"""

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guided_diffusion import gaussian_diffusion, pixel_as_param  # noqa: E402
from guided_diffusion.checkpoints import load_with_sidecar  # noqa: E402
from guided_diffusion.pixel_as_param import PxPConfig, correction  # noqa: E402
from guided_diffusion.sampling_networks import classifier_guidance, label_aware  # noqa: E402
from guided_diffusion.script_util import create_diffusion, diffusion_defaults  # noqa: E402


@contextlib.contextmanager
def recorded_directions():
    """Record the Directions of every PixelAsParam step the loops combine (a probe around pixel_as_param.combine)."""
    records, combine = [], pixel_as_param.combine

    def recording(directions, config, guidance_state=None):
        records.append(directions)
        return combine(directions, config, guidance_state)

    gaussian_diffusion.pixel_as_param.combine = recording
    try:
        yield records
    finally:
        gaussian_diffusion.pixel_as_param.combine = combine


def flat_norm(v):
    """Per-sample L2 norms of a batch."""
    return v.flatten(1).norm(dim=1)


def to_uint8(x):
    """[-1, 1] NCHW images as uint8 NHWC."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv=None):
    """Sample with cls_den, ADM-G and the bounded projection; print the per-step norms and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection_term"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, flags = load_with_sidecar(ROOT / "models" / "digits_cond.pt")
    classifier, _ = load_with_sidecar(ROOT / "models" / "digits_classifier.pt")
    diffusion = create_diffusion(**dict({k: flags[k] for k in diffusion_defaults()}, timestep_respacing=str(args.steps)))
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.num_samples, 3, flags["image_size"], flags["image_size"], generator=gen)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(args.steps)]
    labels = torch.arange(args.num_samples) % 10

    def sample(pxp):
        return diffusion.p_sample_loop(
            label_aware(model, True), x_T.shape, noise=x_T, cond_fn=classifier_guidance(classifier, args.scale),
            model_kwargs={"y": labels}, device=x_T.device, step_noise=noises.__getitem__, pxp=pxp,
        )

    with recorded_directions() as records:
        projected = sample(PxPConfig(mode="cls_den"))
    adm_g, bounded = sample(PxPConfig()), sample(PxPConfig(mode="cls_den", bound=1.0))

    rows, total = [], torch.zeros_like(x_T)
    print("t (of 100) | ||den|| | ||cls|| | beta (median) | ||beta cls|| | fired")
    for index, d in zip(reversed(range(args.steps)), records):
        beta = correction((d.den * d.cls).flatten(1).sum(1), (d.cls * d.cls).flatten(1).sum(1))
        term = beta[:, None, None, None] * d.cls
        total += term
        row = dict(t=index, den=flat_norm(d.den).mean().item(), cls=flat_norm(d.cls).mean().item(),
                   beta=beta[beta > 0].median().item() if (beta > 0).any() else 0.0,
                   term=flat_norm(term).mean().item(), fired=(beta > 0).float().mean().item())
        rows.append(row)
        if index % 10 == 0 or index < 3:
            print(f"{row['t']:3d} | {row['den']:7.3f} | {row['cls']:.2e} | {row['beta']:.2e} | {row['term']:.3f} | {row['fired']:.2f}")
    channel_spread = lambda x: (x - x.mean(1, keepdim=True)).abs().mean().item()  # noqa: E731
    print(f"sum of the corrections: norm {flat_norm(total).mean():.3f} per sample; mean |channel - channel mean| in [-1, 1] units: "
          f"cls_den {channel_spread(projected):.3f}, ADM-G {channel_spread(adm_g):.3f}, bound 1 {channel_spread(bounded):.3f}")
    draw(rows, [("cls_den", projected), ("sum of beta*cls", total), ("ADM-G", adm_g), ("cls_den, --pxp_bound 1", bounded)], args)


def draw(rows, panels, args):
    """The sample grids (the correction's sum shown at a symmetric colour scale around grey) and the norms per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4.2))
    for ax, (title, x) in zip(axes, panels):
        if title.startswith("sum"):
            x = x / x.abs().max()
        images = to_uint8(x)
        side = int(np.ceil(np.sqrt(len(images))))
        grid = np.full((side * 9 + 1, side * 9 + 1, 3), 128, np.uint8)
        for k, image in enumerate(images):
            r, c = divmod(k, side)
            grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = image
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    ax = axes[-1]
    ts = [r["t"] for r in rows]
    for key, label in (("den", "||den||"), ("cls", "||cls||"), ("beta", "beta (median where it fired)"), ("term", "||beta cls||")):
        ax.plot(ts, [r[key] or np.nan for r in rows], label=label)  # gaps: steps where no projection fired
    ax.set(yscale="log", xlabel="timestep index t (sampling runs right to left)", title=f"cls_den at scale {args.scale:g}")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=90)
    plt.close(fig)
    print(f"figure: {args.out}.png")


if __name__ == "__main__":
    main()
