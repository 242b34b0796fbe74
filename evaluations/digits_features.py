"""The "Inception" of the digits domain: a small CNN trained on the clean digits train split only,
independent of the diffusion models and the noisy classifier, whose penultimate features stand
in for Inception's pool_3 (FID, precision, recall) and whose logits give the accuracy of
samples on their target labels.

    python evaluations/digits_features.py samples_16x8x8x3.npz    # score digits batches
    python evaluations/digits_features.py                         # train it: models/digits_evaluator.pt (+ .json)

    from evaluations.digits_features import load_evaluator
    features, logits = load_evaluator()(images)     # images: uint8 [N, H, W, 3]

Images of any size are averaged over their channels and area-resized to 8x8 (the digits' own
resolution), so samples at 8x8 or upscaled sizes are scored alike. A batch is scored as the
digits benchmarks score it: accuracy on its labels (arr_1), FID, precision and recall in these
features against the 360 held-out digits (the real train digits score FID 4.27 there).
"""

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.checkpoints import load_weights, parse_flags, sidecar_flags, write_sidecar
from guided_diffusion.digits import digits_split
from guided_diffusion.errors import UsageError
from evaluations.metrics import compute_statistics, frechet_distance, precision_recall
from guided_diffusion.npz_io import atomic_output, read_labeled_images

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "models" / "digits_evaluator.pt"
NUM_CLASSES = 10
DEFAULTS = dict(width=32, feature_dim=128)  # the architecture flags of the sidecar


class DigitsNet(nn.Module):
    """Two conv stages (8x8 -> 4x4 -> 2x2) and a hidden layer whose ReLU output is the feature vector."""

    def __init__(self, width=32, feature_dim=128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(8 * width, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(feature_dim, NUM_CLASSES)

    def forward(self, x):
        """(features [N, feature_dim], logits [N, 10]) of gray images [N, 1, 8, 8] in [0, 1]."""
        features = F.relu(self.hidden(self.conv(x).flatten(1)))
        return features, self.out(self.dropout(features))


def to_input(images):
    """uint8 [N, H, W, 3] images as the network's gray 8x8 input in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    x = th.from_numpy(images).float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2) / 255
    return x if x.shape[-1] == 8 and x.shape[-2] == 8 else F.interpolate(x, size=(8, 8), mode="area")


class DigitsFeatures:
    """A trained DigitsNet as a function of uint8 image batches: (features, logits) as numpy arrays."""

    def __init__(self, net, device="cpu", batch_size=500):
        self.net = net.to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @th.no_grad()
    def __call__(self, images):
        """(features [N, feature_dim], logits [N, 10]) of uint8 images [N, H, W, 3]."""
        x = to_input(images)
        outs = [self.net(x[i : i + self.batch_size].to(self.device)) for i in range(0, len(x), self.batch_size)]
        return tuple(th.cat(parts).cpu().numpy() for parts in zip(*outs))

    def accuracy(self, images, labels):
        """Fraction of images classified as their label."""
        return float((self(images)[1].argmax(-1) == np.asarray(labels)).mean())


def load_evaluator(path=DEFAULT_PATH, device="cpu"):
    """The committed (or another trained) evaluator network, architecture from its sidecar."""
    flag_string = sidecar_flags(path) or ""
    flags = parse_flags(flag_string, DEFAULTS)
    return DigitsFeatures(load_weights(DigitsNet(**flags), path), device)


def score(evaluator, reference, images, labels=None):
    """accuracy on the target labels (None without labels), FID, precision and recall against the reference features."""
    features, logits = evaluator(images)
    mu, sigma = compute_statistics(features)
    precision, recall = precision_recall(reference["features"], features, half=False)
    return dict(
        accuracy=None if labels is None else float((logits.argmax(-1) == np.asarray(labels)).mean()),
        fid=float(frechet_distance(mu, sigma, reference["mu"], reference["sigma"])),
        precision=precision,
        recall=recall,
    )


def held_out_reference(path=DEFAULT_PATH):
    """(the evaluator, the held-out digits' features and statistics, the real train digits' scores against them)."""
    evaluator = load_evaluator(path)
    features = evaluator(digits_split()["held_out"][0])[0]
    mu, sigma = compute_statistics(features)
    reference = dict(features=features, mu=mu, sigma=sigma)
    train_images, train_labels, _ = digits_split()["train"]
    return evaluator, reference, score(evaluator, reference, train_images, train_labels)


def shift_augment(x, generator, max_shift=1):
    """Translate each image by up to max_shift pixels (zero fill), the one augmentation used."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    dy, dx = th.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    out = th.empty_like(x)
    for sy in range(2 * max_shift + 1):
        for sx in range(2 * max_shift + 1):
            sel = (dy == sy) & (dx == sx)
            out[sel] = padded[sel, :, sy : sy + h, sx : sx + w]
    return out


def train_evaluator(out_path=DEFAULT_PATH, epochs=60, batch_size=64, lr=2e-3, seed=0, width=32, feature_dim=128):
    """Train on the clean train split, save the weights and sidecar; returns the held-out accuracy."""
    split = digits_split()
    images, labels, _ = split["train"]
    x, y = to_input(images), th.from_numpy(labels)
    th.manual_seed(seed)
    gen = th.Generator().manual_seed(seed)
    net = DigitsNet(width, feature_dim)
    opt = th.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = th.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (len(x) // batch_size))
    for epoch in range(epochs):
        net.train()
        order = th.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(net(shift_augment(x[idx], gen))[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    held_images, held_labels, _ = split["held_out"]
    accuracy = DigitsFeatures(net).accuracy(held_images, held_labels)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_path) as tmp_path:  # a kill never leaves half a weights file
        th.save(net.state_dict(), tmp_path)
    write_sidecar(str(out_path), "digits_features", f"--width {width} --feature_dim {feature_dim}")
    return accuracy


def build_parser():
    """The command-line flags, each with its default in its help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "batches", nargs="*", help="sample .npz files to score (arr_0 uint8 images, arr_1 labels if any); none: train (default: none)"
    )
    parser.add_argument(
        "--evaluator", default=str(DEFAULT_PATH), help="the evaluator weights that score batches (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_PATH), help="where to save the weights, with the sidecar <out>.json (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=60, help="passes over the clean train split (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights, batch order and shifts (default: %(default)s)"
    )
    return parser


def score_batches(paths, evaluator_path=DEFAULT_PATH):
    """Print one line of scores per .npz batch."""
    evaluator, reference, _ = held_out_reference(evaluator_path)
    for path in paths:
        images, labels = read_labeled_images(path)
        result = score(evaluator, reference, images, labels)
        accuracy = "no labels" if result["accuracy"] is None else f"accuracy {result['accuracy']:.3f}"
        print(f"{path}: {len(images)} samples, {accuracy}, FID {result['fid']:.2f}, "
              f"precision {result['precision']:.3f}, recall {result['recall']:.3f}" + (" (FID needs ~1,000 samples)" if len(images) < 1000 else ""))


def main(argv=None):
    """Score the batches given, or train the evaluator and print its held-out accuracy."""
    args = build_parser().parse_args(argv)
    try:
        if args.batches:
            score_batches(args.batches, args.evaluator)
            return 0
        start = time.time()
        accuracy = train_evaluator(args.out, epochs=args.epochs, seed=args.seed)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"held-out accuracy {accuracy:.4f}; saved {args.out} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
