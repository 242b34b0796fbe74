"""Times the evaluator's InceptionV3 feature extraction (images per second) on this machine.

    python benchmarks/evaluator_speed.py [--num_images 64] [--image_size 256] [--batch_size 32]

Uses the real architecture with seeded random weights, so it runs offline; the timing is the
same as with the real weights file.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from evaluations.inception import InceptionFeatures, seeded_state_dict


def parse_args():
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=64, help="random images timed per pass (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=256, help="their side in pixels, resized to 299 by the network (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per network call (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best and the median are reported (default: %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args()


def time_pass(extractor, images, batch_size):
    """Seconds to extract the features of all images once."""
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        extractor(images[first : first + batch_size])
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    """Builds the seeded network, warms it up on one batch, then times passes over the whole set."""
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "seeded-inception.pth"
        torch.save(seeded_state_dict(seed=0), weights)
        extractor = InceptionFeatures(weights, args.device)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    extractor(images[: args.batch_size])  # warm-up: first-call allocations are not timed
    rates = sorted(args.num_images / time_pass(extractor, images, args.batch_size) for _ in range(args.repeats))
    print(
        f"{args.num_images} images of {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{extractor.device}, {torch.get_num_threads()} threads: "
        f"best {rates[-1]:.1f} images/s, median {rates[len(rates) // 2]:.1f} images/s"
    )


if __name__ == "__main__":
    main()
