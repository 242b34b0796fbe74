"""Builds an evaluator reference batch from a folder of images or an `.npz` of images.

    python evaluations/make_ref_batch.py DATA_DIR_OR_NPZ OUT.npz [--num_images 10000] [--image_size 256]

The output holds `arr_0` (a random subset of `--num_images` images, uint8 [N, S, S, 3]) and
`mu`/`sigma`/`mu_s`/`sigma_s`, the Inception statistics of ALL input images, which the
evaluator uses as they are. Images are centre-cropped and resized to `--image_size` the way
guided-diffusion's data loader does. The file appears only once it is complete: an error, a
full disk or Ctrl-C (exit status 130) leaves any earlier file at that path as it was.
"""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `evaluations` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from evaluations.evaluator import DEVICE_HELP, INCEPTION_PATH_HELP, positive_int
from evaluations.inception import InceptionFeatures
from evaluations.metrics import RunningStatistics
from guided_diffusion.npz_io import IMAGES, STATISTICS, InputError, atomic_npz, check_output, open_images

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MIN_IMAGES = 2  # a covariance needs two images


def center_crop(image, size):
    """Scales an RGB PIL image so its short side is `size` (box-halving, then bicubic) and crops the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def fit_array(pixels, size):
    """An HWC uint8 image at size x size: unchanged when it already is, else centre-cropped."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return center_crop(Image.fromarray(pixels), size)


def load_image(path, size):
    """An image file as a size x size RGB uint8 array, or an InputError naming the file."""
    try:
        with Image.open(path) as image:
            return center_crop(image.convert("RGB"), size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from None


def list_images(folder):
    """Image files under `folder`, recursively, in sorted order."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(paths) < MIN_IMAGES:
        raise InputError(f"{folder}: needs at least {MIN_IMAGES} images ({', '.join(sorted(IMAGE_EXTENSIONS))}), found {len(paths)}")
    return paths


def folder_batches(paths, size, batch_size):
    """Yields [n, size, size, 3] uint8 batches decoded from image files on a thread pool."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for start in range(0, len(paths), batch_size):
            yield np.stack(list(pool.map(lambda p: load_image(p, size), paths[start : start + batch_size])))


def npz_batches(reader, size, batch_size):
    """Yields [n, size, size, 3] uint8 batches from an open `.npz` image reader."""
    for images in reader.batches(batch_size):
        yield np.stack([fit_array(pixels, size) for pixels in images])


@contextmanager
def open_source(source, size, batch_size):
    """Yields (batches, number of images) for a folder of images or an `.npz` file."""
    if os.path.isdir(source):
        paths = list_images(source)
        yield folder_batches(paths, size, batch_size), len(paths)
    else:
        with open_images(source, MIN_IMAGES) as reader:
            yield npz_batches(reader, size, batch_size), reader.num_images


def choose_subset(total, count, seed):
    """A boolean mask over `total` images selecting `count` of them at random (all if fewer)."""
    keep = np.zeros(total, dtype=bool)
    keep[np.random.default_rng(seed).permutation(total)[: min(count, total)]] = True
    return keep


def write_reference(out_path, batches, total, args):
    """Streams batches through Inception into `out_path`: the chosen images plus statistics of all."""
    keep = choose_subset(total, args.num_images, args.seed)
    stats = {"pool": RunningStatistics(), "spatial": RunningStatistics()}
    shape = (int(keep.sum()), args.image_size, args.image_size, 3)
    seen = 0
    with atomic_npz(out_path) as writer:
        extractor = InceptionFeatures(args.inception_path, args.device)
        with writer.stream_images(IMAGES, shape) as append, tqdm(total=total, unit="img", desc="activations") as bar:
            for images in batches:
                features = extractor(images)
                stats["pool"].update(features.pool)
                stats["spatial"].update(features.spatial)
                append(images[keep[seen : seen + len(images)]])
                seen += len(images)
                bar.update(len(images))
        for kind, (mu_name, sigma_name, _) in STATISTICS.items():
            mu, sigma = stats[kind].statistics()
            writer.write(mu_name, mu)
            writer.write(sigma_name, sigma)
    return shape[0]


def build_parser():
    """The command-line flags, each with its default in its help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of images (searched recursively) or an .npz with arr_0")
    parser.add_argument("output", help="the reference batch .npz to write (not the source itself)")
    parser.add_argument("--num_images", type=positive_int, default=10000, help="images stored in arr_0 (default: %(default)s)")
    parser.add_argument("--image_size", type=positive_int, default=256, help="side of the stored square images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset stored in arr_0 (default: %(default)s)")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images per Inception forward pass (default: %(default)s)")
    parser.add_argument("--inception_path", help=INCEPTION_PATH_HELP)
    parser.add_argument("--device", help=DEVICE_HELP)
    return parser


def main(argv=None):
    """Builds the reference batch; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        check_output(args.output, [args.source])
        with open_source(args.source, args.image_size, args.batch_size) as (batches, total):
            kept = write_reference(args.output, batches, total, args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.output} was not written (any earlier file there is unchanged)", file=sys.stderr)
        return 130
    print(f"wrote {args.output}: {kept} images of {args.image_size}x{args.image_size}, statistics over {total} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
