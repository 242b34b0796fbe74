"""Write scikit-learn's digits as image folders for the training scripts, and as .npz batches for evaluation.

    python scripts/prepare_digits.py --out_dir /tmp/digits

makes OUT_DIR/train/ and OUT_DIR/held_out/ (RGB PNGs `<class>_<index>.png`, the class read by
`load_data`, the index into `load_digits()`) and OUT_DIR/train.npz, OUT_DIR/held_out.npz
(arr_0: uint8 [N, S, S, 3], arr_1: labels), from a fixed seeded stratified split (1,437 / 360).
"""

import os
import tempfile

import numpy as np
from PIL import Image

from guided_diffusion import harness
from guided_diffusion.digits import SPLIT_SEED, digits_split


def write_digits(out_dir, image_size=8, resample="nearest", seed=SPLIT_SEED):
    """Write both parts of the split under out_dir; returns {part: number of images}."""
    counts = {}
    for part, (images, labels, indices) in digits_split(image_size, resample, seed).items():
        folder = os.path.join(out_dir, part)
        os.makedirs(folder, exist_ok=True)
        for image, label, index in zip(images, labels, indices):
            Image.fromarray(image).save(os.path.join(folder, f"{label}_{index:04d}.png"))
        np.savez(os.path.join(out_dir, f"{part}.npz"), images, labels)
        counts[part] = len(images)
    return counts


def create_argparser():
    """The script's flags, grouped, with help."""
    defaults = dict(out_dir=os.path.join(tempfile.gettempdir(), "digits"), image_size=8, resample="nearest", seed=SPLIT_SEED)
    return harness.create_argparser(__doc__, defaults, context="prepare_digits")


def main():
    """Parse flags and write the dataset."""
    args = create_argparser().parse_args()
    counts = write_digits(args.out_dir, args.image_size, args.resample, args.seed)
    for part, count in counts.items():
        print(f"{count} images in {os.path.join(args.out_dir, part)}/ and {part}.npz")


if __name__ == "__main__":
    harness.run_script(main)
