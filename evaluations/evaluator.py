"""Evaluates a sample batch against a reference batch: Inception Score, FID, sFID, precision, recall.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json results.json]

Both files hold `arr_0`, uint8 images [N, H, W, 3]; a batch's own precomputed `mu`/`sigma`
(pool_3) and `mu_s`/`sigma_s` (spatial) statistics are used instead of recomputing them.
Bad input is reported in one line with exit status 1; Ctrl-C exits with status 130.
The metric functions are re-exported here so that `from evaluations.evaluator import
frechet_distance` works without building the Inception network.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `evaluations` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm.auto import tqdm

from evaluations.inception import Features, InceptionFeatures
from evaluations.metrics import compute_statistics, frechet_distance, inception_score, manifold_radii, precision_recall
from guided_diffusion.npz_io import InputError, atomic_output, check_output, open_images, read_statistics

__all__ = [  # the metric functions are re-exported for callers of this module
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "manifold_radii",
    "precision_recall",
    "evaluate",
    "main",
]

K_NEIGHBOURS = 3  # precision/recall neighbourhood size, as in ADM
MIN_IMAGES = K_NEIGHBOURS + 1  # a k-NN radius needs k other images; a covariance needs two
RESULT_NAMES = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}


def check_batch(path):
    """Validates a batch's images and statistics up front, before any network is built."""
    with open_images(path, MIN_IMAGES):
        pass
    read_statistics(path)


def batch_features(path, extractor, batch_size):
    """Features (pool, spatial, probs) of every image in a batch, streamed from the file."""
    parts = []
    with open_images(path, MIN_IMAGES) as reader:
        with tqdm(total=reader.num_images, unit="img", desc=f"activations {Path(path).name}") as bar:
            for images in reader.batches(batch_size):
                parts.append(extractor(images))
                bar.update(len(images))
    return Features(*(np.concatenate(column) for column in zip(*parts)))


def batch_statistics(path, features):
    """(pool, spatial) statistics of a batch: its stored ones where present, else computed."""
    stored = read_statistics(path)
    return (
        stored.get("pool") or compute_statistics(features.pool),
        stored.get("spatial") or compute_statistics(features.spatial),
    )


def evaluate(ref_path, sample_path, extractor, batch_size=64, device=None):
    """The five metrics of a sample batch against a reference batch, as a dict."""
    ref = batch_features(ref_path, extractor, batch_size)
    sample = batch_features(sample_path, extractor, batch_size)
    ref_pool, ref_spatial = batch_statistics(ref_path, ref)
    sample_pool, sample_spatial = batch_statistics(sample_path, sample)
    precision, recall = precision_recall(ref.pool, sample.pool, K_NEIGHBOURS, device=device)
    return {
        "inception_score": inception_score(sample.probs),
        "fid": frechet_distance(*sample_pool, *ref_pool),
        "sfid": frechet_distance(*sample_spatial, *ref_spatial),
        "precision": precision,
        "recall": recall,
    }


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


INCEPTION_PATH_HELP = (
    "InceptionV3 weights file, read as plain tensors (default: torch hub's cache, "
    "$TORCH_HOME/hub/checkpoints/, where it is downloaded once)"
)
DEVICE_HELP = "torch device (default: cuda when available, else cpu)"


def build_parser():
    """The command-line flags, each with its default in its help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0)")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images per Inception forward pass (default: %(default)s)")
    parser.add_argument("--inception_path", help=INCEPTION_PATH_HELP)
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--json", help="also write the results to this JSON file (default: none, print only)")
    return parser


def main(argv=None):
    """Runs the evaluation and prints the results; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            check_output(args.json, [args.ref_batch, args.sample_batch])
        check_batch(args.ref_batch)
        check_batch(args.sample_batch)
        extractor = InceptionFeatures(args.inception_path, args.device)
        results = evaluate(args.ref_batch, args.sample_batch, extractor, args.batch_size, extractor.device)
        for key, label in RESULT_NAMES.items():
            print(f"{label}: {results[key]}")
        if args.json:
            with atomic_output(args.json) as tmp_path:
                Path(tmp_path).write_text(json.dumps(results, indent=2) + "\n")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no results were written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
