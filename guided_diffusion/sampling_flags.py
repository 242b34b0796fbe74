"""The flags every sampling script takes, their checks, and the output folder that the same command finds again.

The output folder is --output's, else $OPENAI_LOGDIR, else samples/<script>-<hash of the
flags>/ under the current folder: run the same command again and it continues there.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile

import torch.distributed as dist

from . import harness, logger
from .dpm_solver import DEFAULT_THRESHOLD, THRESHOLDS
from .errors import UsageError
from .gaussian_diffusion import SAMPLERS
from .sampling_networks import AUTOCAST_DTYPES

MAX_SAMPLES = 10_000_000  # 200 times FID's 50,000; beyond it a run would take years and its .npz terabytes
# flags that change how a run is carried out or where it writes, not which samples it makes
# (channels_last and compile change float32 results only by rounding, as another CPU or thread count would)
NOT_IN_FINGERPRINT = ("batch_size", "grid_size", "pxp_stats", "channels_last", "compile", "output")


def sampling_defaults():
    """Flags that every sampling script takes (--seed None: unseeded samples)."""
    return dict(
        model_path="",
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        sampler="ddpm",
        use_ddim=False,
        eta=0.0,
        x0_threshold=DEFAULT_THRESHOLD,
        seed=None,
        labels="random",
        batch_invariant=True,
        output="",
        grid_size=8,
        autocast="",
        channels_last=False,
        compile=False,
    )


def start(parser, argv=None, embedded=None):
    """Parse and check the flags, make the output folder and log there; returns (args, names of the flags given).

    Knowing which flags were typed lets them override a checkpoint's own flags, while the
    script's defaults do not. `embedded` holds the flags of a run that needs no download: they
    apply, as if typed, when no --model_path is given (flags that are typed still win).
    """
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    explicit = {name for name, value in vars(given).items() if value is not unset}
    if embedded and "model_path" not in explicit:
        parser.set_defaults(**embedded)
        explicit |= set(embedded)
        if dist.get_rank() == 0:
            print(f"no --model_path: sampling the embedded default ({', '.join(f'--{k} {v}' for k, v in embedded.items())})")
    args = parser.parse_args(argv)
    _check(args, parser.get_default("num_samples"))
    args.sampler = resolve_sampler(args, explicit)
    harness.collective(lambda: dist.get_rank() == 0 and _make_folders(args), broadcast=True)
    logger.configure(dir=output_folder(args))
    return args, explicit


def _check(args, default_num_samples):
    """Raise UsageError for a flag value that cannot work (before any file is read)."""
    least = 0 if default_num_samples == 0 else 1  # super_res_sample.py: 0 is one per base sample
    if args.num_samples is not None and not least <= args.num_samples <= MAX_SAMPLES:
        raise UsageError(f"--num_samples must be {'0 or more' if least == 0 else 'positive'} and at most {MAX_SAMPLES:,} (got {args.num_samples})")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive (got {args.batch_size})")
    if args.grid_size < 0:
        raise UsageError(f"--grid_size must be 0 (no grid) or more (got {args.grid_size})")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be 0 or more (got {args.seed})")
    parse_labels(args.labels)
    if args.autocast and args.autocast not in AUTOCAST_DTYPES:
        raise UsageError(f"--autocast must be bf16, fp16 or empty for float32 (got {args.autocast!r})")
    if getattr(args, "timestep_respacing", ""):
        check_respacing(args.timestep_respacing)
    for flag, path in (("--output", args.output if args.output.endswith(".npz") else ""), ("--pxp_stats", getattr(args, "pxp_stats", ""))):
        if path and os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder: name a file")


def resolve_sampler(args, explicit=()):
    """The sampler the flags ask for (--use_ddim True means ddim); UsageError for flags that contradict it.

    :param explicit: the names of the flags typed (a typed --sampler ddpm contradicts --use_ddim True).
    """
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler {args.sampler!r}: use one of {', '.join(SAMPLERS)}")
    sampler = args.sampler
    if args.use_ddim:
        if sampler != "ddim" and (sampler != "ddpm" or "sampler" in explicit):
            raise UsageError(f"--use_ddim True and --sampler {sampler} contradict each other: drop --use_ddim (it means --sampler ddim)")
        sampler = "ddim"
    if args.eta and sampler != "ddim":
        raise UsageError(f"--eta is DDIM's noise level, not {sampler}'s: add --sampler ddim (or --use_ddim True)")
    if args.x0_threshold not in THRESHOLDS:
        raise UsageError(f"unknown --x0_threshold {args.x0_threshold!r}: use one of {', '.join(THRESHOLDS)}")
    if args.x0_threshold != DEFAULT_THRESHOLD and not sampler.startswith("dpmpp"):
        raise UsageError(f"--x0_threshold bounds the guided x0 of the DPM-Solver++ samplers, not {sampler}'s: add --sampler dpmpp_2m or dpmpp_2m_sde")
    return sampler


def parse_labels(text):
    """--labels as "random", "cycle" or a tuple of class ids (a comma list, e.g. "3" or "1,7")."""
    if text in ("random", "cycle"):
        return text
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0:
        raise UsageError(f"--labels must be random, cycle or a comma list of class ids such as 3 or 1,7 (got {text!r})")
    return ids


def check_respacing(text):
    """Raise UsageError unless --timestep_respacing is N, N1,N2,... or ddimN with positive counts."""
    try:
        counts = [int(text[len("ddim") :])] if text.startswith("ddim") else [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0:
        raise UsageError(f"--timestep_respacing must be a positive step count (250), counts per section (10,20) or ddimN (got {text!r})")


def output_folder(args):
    """Where the run's files go: --output's folder, else $OPENAI_LOGDIR, else samples/<script>-<hash of the flags>."""
    if args.output:
        return (os.path.dirname(args.output) or ".") if args.output.endswith(".npz") else args.output
    if os.getenv("OPENAI_LOGDIR"):
        return os.getenv("OPENAI_LOGDIR")
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_FINGERPRINT}
    digest = hashlib.sha256(json.dumps(flags, default=str).encode()).hexdigest()[:8]
    return os.path.join("samples", f"{os.path.splitext(os.path.basename(sys.argv[0]))[0]}-{digest}")


def _make_folders(args):
    """Make the output folder and --pxp_stats's, checking they are writable, before any work (rank 0).

    A folder made here is removed again if the run fails while it holds nothing but logs.
    """
    folders = {output_folder(args): "output"}
    if getattr(args, "pxp_stats", ""):
        folders.setdefault(os.path.dirname(args.pxp_stats) or ".", "--pxp_stats")
    for directory, flag in folders.items():
        made = [d for d in _with_parents(directory) if not os.path.isdir(d)]
        try:
            os.makedirs(directory, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
        except OSError as e:
            raise UsageError(f"cannot write to the {flag} folder {directory}: {e.strerror or e}") from e
        if made:
            harness.on_failure(lambda made=made: _remove_if_only_logs(made))


def _with_parents(directory):
    """directory, its parent, and so on up to the first component of the path."""
    path = os.path.normpath(directory)
    while path not in ("", ".", os.sep):
        yield path
        path = os.path.dirname(path)


def _remove_if_only_logs(made):
    """Remove the folders this run made (innermost first) if they hold nothing but the logger's files."""
    try:
        for directory in made:
            names = os.listdir(directory)
            if not all(n.startswith(("log", "progress.")) and os.path.isfile(os.path.join(directory, n)) for n in names):
                return
            for name in names:
                os.remove(os.path.join(directory, name))
            os.rmdir(directory)
    except OSError:
        pass  # a folder that cannot be tidied is left as it is
