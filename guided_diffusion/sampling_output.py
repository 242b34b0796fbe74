"""A sampling run's output: its settings and fingerprint, and the finished .npz streamed from the saved batches.

The output is `samples_<N>x<H>x<W>x3.npz` (arr_0 uint8 NHWC, arr_1 int64 labels) with
`<output>.json` beside it: the run's fingerprint (the resolved flags of every network after
its sidecar, the SHA-256 of every input file, the package version). An output counts as
finished only when it is a readable batch of the right shape whose fingerprint matches; a
rerun with other settings refuses rather than taking another run's samples as its own.
"""

import importlib.metadata
import json
import os

import numpy as np
import torch.distributed as dist

from .npz_io import InputError, atomic_npz, open_images

from . import harness, logger
from .checkpoints import file_sha256
from .errors import UsageError
from .flag_help import group_of, group_rank
from .pixel_as_param import plot_stats
from .sampling_flags import NOT_IN_FINGERPRINT
from .sampling_progress import Progress, differences, write_json

_NETWORK_GROUPS = ("model", "classifier", "diffusion")  # the flags shown on a checkpoint's line of the banner
GRID_BORDER, BORDER_GREY = 2, 128  # the PNG grid's lines around its cells: width in pixels, grey level


class Output:
    """Where a run's files go, and its fingerprint.

    :param checkpoints: the run's `Checkpoint`s (their resolved flags and files' hashes are in the fingerprint).
    :param files: flags naming other input files whose content is in the fingerprint (e.g. base_samples).
    """

    def __init__(self, args, num_samples, image_size, checkpoints, files=()):
        self.num_samples, self.image_size = num_samples, image_size
        name = f"samples_{num_samples}x{image_size}x{image_size}x3.npz"
        self.path = args.output if args.output.endswith(".npz") else os.path.join(logger.get_dir(), name)
        self.record = f"{self.path}.json"
        self.grid = self.path[: -len(".npz")] + ".png"
        self.partial = self.path[: -len(".npz")] + ".partial"
        inputs = {c.flag: c.path for c in checkpoints} | {f"--{flag}": getattr(args, flag) for flag in files}
        hashes = harness.collective(lambda: dist.get_rank() == 0 and {flag: file_sha256(path) for flag, path in inputs.items()}, broadcast=True)
        self.fingerprint = _fingerprint(args, checkpoints, hashes)
        self.progress = None  # rank 0's, once claimed
        if dist.get_rank() == 0:
            logger.log(_banner(args, checkpoints, self.path))

    def claim(self):
        """Lock the progress folder for this run (rank 0); False, on every rank, if the output is already finished.

        A progress folder left beside a finished output (a kill between the two) is removed here.
        """
        done = harness.collective(lambda: dist.get_rank() == 0 and self._claim(), broadcast=True)
        if done:
            logger.log(f"already sampled: {self.path} (delete it to sample again)")
        return done is False

    def _claim(self):
        """Rank 0's part of claim(): True if finished (its progress folder gone), else False with the folder locked."""
        progress, stale = Progress(self.partial, self.fingerprint), os.path.isdir(self.partial)
        progress.lock()
        try:
            finished = self._finished()
        except UsageError:
            progress.remove_if_unused()
            raise
        if finished:
            progress.remove()
            if stale:
                logger.log(f"removed {self.partial}, left by a run stopped after it wrote {self.path}")
            return True
        self.progress = progress
        harness.on_failure(progress.remove_if_unused)
        return False

    def _finished(self):
        """Whether the output holds this run's samples; UsageError if it holds anything else."""
        if not os.path.lexists(self.path):
            return False
        fix = "delete it or choose another --output"
        if os.path.isdir(self.path):
            raise UsageError(f"{self.path} is a folder, not a finished sample batch: {fix}")
        try:
            with open_images(self.path, min_images=1) as reader:
                shape = tuple(reader.shape)
        except InputError as e:
            raise UsageError(f"{self.path} is there but is not a finished sample batch ({str(e).replace(f'{self.path}: ', '')}): {fix}") from e
        if shape != (self.num_samples, self.image_size, self.image_size, 3):
            raise UsageError(f"{self.path} holds arrays of shape {list(shape)}, not this run's samples: {fix}")
        try:
            with open(self.record) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{self.path} has no readable fingerprint {self.record} saying which settings made it ({e}): {fix}") from e
        changed = differences(recorded, self.fingerprint) if isinstance(recorded, dict) else ["unreadable"]
        if changed:
            raise UsageError(f"{self.path} holds samples of other settings ({', '.join(changed)}): {fix}")
        return True

    def write(self, grid_size, stats_path=""):
        """Write the grid, the statistics, the fingerprint and then the samples (rank 0); the run is then finished.

        The .npz is streamed from the saved batches, one batch in memory at a time.
        """
        progress = self.progress
        if grid_size:
            first = np.concatenate(list(_first_rows(progress.chunks("arr_0"), grid_size * grid_size)))
            save_grid(first, grid_size, self.grid)
            logger.log(f"grid of the first samples: {self.grid}")
        if stats_path:
            _write_stats(progress.stats.to_dict(), stats_path)
        try:
            write_json(self.record, self.fingerprint)
            with atomic_npz(self.path) as npz:
                with npz.stream_images("arr_0", (self.num_samples, self.image_size, self.image_size, 3)) as append:
                    for chunk in progress.chunks("arr_0"):
                        append(chunk)
                if progress.labelled:
                    npz.write("arr_1", np.concatenate(list(progress.chunks("arr_1"))))
        except (InputError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise UsageError(f"cannot write {self.path} ({reason}): the saved samples in {progress.path} are kept; make room and run the same command again") from e
        progress.remove()
        logger.log(f"saved {self.num_samples} samples to {self.path}")


def _fingerprint(args, checkpoints, hashes):
    """The settings that decide a run's samples, as a flat JSON-ready dict (see the module docstring)."""
    owned = {name for c in checkpoints for name in c.flags} | {flag[2:] for flag in hashes}
    fingerprint = {"version": _version()}
    fingerprint.update({f"--{k}": v for k, v in sorted(vars(args).items()) if k not in NOT_IN_FINGERPRINT and k not in owned})
    fingerprint.update({f"{flag} sha256": digest for flag, digest in hashes.items()})
    for c in checkpoints:
        fingerprint.update({f"{c.flag} --{k}": v for k, v in c.flags.items()})
    return json.loads(json.dumps(fingerprint))


def _version():
    """The installed package's version ("unknown" when run from a clone that is not installed)."""
    try:
        return importlib.metadata.version("guided-diffusion-pxp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _banner(args, checkpoints, path):
    """The effective settings (embedded default, then checkpoint flags, then typed flags), by help group, and the output."""
    def shown(name, value):
        value = '""' if value == "" else value
        return f"--{name} {value}" + (" (auto)" if getattr(args, name, None) == "auto" and value != "auto" else "")

    lines, groups = ["settings:"], {}
    for c in checkpoints:
        network = {k: v for k, v in c.flags.items() if group_of(k) in _NETWORK_GROUPS}
        source = f"flags from {c.source}" if c.source else "no flags of its own"
        lines.append(f"  {c.flag} {c.path} ({source}): {' '.join(shown(k, v) for k, v in network.items())}")
        for k, v in c.flags.items():
            if k not in network:  # e.g. PixelAsParam's flags: shown once, with the run's
                groups.setdefault(group_of(k), {}).setdefault(k, v)
    paths = {c.flag[2:] for c in checkpoints}
    for k, v in vars(args).items():
        if k not in paths and not any(k in c.flags for c in checkpoints):
            groups.setdefault(group_of(k), {})[k] = v
    lines += [f"  {group}: {' '.join(shown(k, v) for k, v in groups[group].items())}" for group in sorted(groups, key=group_rank)]
    return "\n".join(lines + [f"output: {path}"])


def _first_rows(chunks, count):
    """The first `count` rows of a stream of arrays."""
    for chunk in chunks:
        if count <= 0:
            return
        yield chunk[:count]
        count -= len(chunk)


def _write_stats(stats_dict, path):
    """The PixelAsParam step statistics as JSON, and a plot beside it when matplotlib is installed."""
    with open(path, "w") as f:
        json.dump(stats_dict, f, indent=1)
    logger.log(f"PixelAsParam statistics: {path}")
    if not stats_dict["steps"]:
        logger.log("no PixelAsParam steps were taken (no guidance, or --pxp_mode none)")
        return
    try:
        plot_stats(stats_dict, os.path.splitext(path)[0] + ".png")
    except UsageError as e:
        logger.log(f"no plot: {e}")


def save_grid(images, grid_size, path, min_tile=64, border=GRID_BORDER):
    """Tile the first grid_size x grid_size images of a uint8 NHWC array (fewer rows if fewer) into a PNG.

    Images smaller than min_tile pixels are enlarged by an integer factor (nearest neighbour),
    so that 8x8 digits are big enough to look at. `border` pixels of mid grey separate the cells
    and frame the grid (cells left empty are grey too).
    """
    from PIL import Image

    n = min(len(images), grid_size * grid_size)
    cols = min(grid_size, n)
    rows = -(-n // cols)
    zoom = max(1, min_tile // images.shape[1])
    tiles = images[:n].repeat(zoom, axis=1).repeat(zoom, axis=2)
    height, width = tiles.shape[1:3]
    canvas = np.full((border + rows * (height + border), border + cols * (width + border), 3), BORDER_GREY, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = border + r * (height + border), border + c * (width + border)
        canvas[top : top + height, left : left + width] = tiles[k]
    Image.fromarray(canvas).save(path)
