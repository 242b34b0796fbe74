"""The sampling driver behind `scripts/*_sample.py`: flags, checkpoints, seeding, MPI sharding, resumable output.

A script declares its flags, which checkpoints it loads and what one sample needs (a `Task`);
this module does the rest:

- Flags of a network: the script's defaults, then the flags its checkpoint carries (the
  sidecar `<checkpoint>.json`, else the README flags of the official checkpoint with the same
  architecture), then the flags given on the command line.
- Work: samples 0..N-1 are cut into batches of `--batch_size` by index. In each round every
  rank takes one batch; rank 0 gathers the round and saves each batch atomically (temporary
  file, then rename) in the folder `<output>.partial/`. Started again with the same flags, a
  run skips the saved batches; when all are there rank 0 writes `samples_<N>x<H>x<W>x3.npz`
  (`arr_0` uint8 NHWC, `arr_1` int64 labels) and a PNG grid, then deletes the folder. A
  finished run is not redone.
- Seeding: with `--seed S`, sample i draws its label, x_T and every step's noise from its own
  generators seeded by (S, i), and the networks see one sample at a time
  (`--batch_invariant True`, since batched kernels round differently with the batch size), so
  the images depend on neither the number of ranks, the batch size nor interruptions.
"""

import argparse
import contextlib
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch as th
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoints import DEFAULTS, OFFICIAL, identify, mismatch_message, parse_flags, read_sidecar
from .errors import UsageError
from .fp16_util import use_fp16_if_supported
from .pixel_as_param import ClassifierFree, StepStats, plot_stats
from .respace import space_timesteps
from .script_util import add_dict_to_argparser, classifier_defaults, create_classifier, create_model_and_diffusion, sr_create_model_and_diffusion

# flags that change how a run is carried out, not which samples it makes (channels_last and
# compile change float32 results only by rounding, as another CPU or thread count would)
_NOT_IN_FINGERPRINT = ("batch_size", "grid_size", "pxp_stats", "channels_last", "compile")
_AUTOCAST_DTYPES = {"bf16": th.bfloat16, "fp16": th.float16}
_LABEL_STREAM, _NOISE_STREAM = 0, 1
_KIND_NAMES = {"model": "diffusion model", "sr": "super-resolution model", "classifier": "classifier"}


def sampling_defaults():
    """Flags that every sampling script takes."""
    return dict(
        model_path="",
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        eta=0.0,
        output="",
        grid_size=8,
        batch_invariant=True,
        labels="random",  # or "cycle": sample i gets class i mod num_classes
        autocast="",  # "bf16" or "fp16": run the networks under torch.autocast
        channels_last=False,
        compile=False,
    )


def create_argparser(*default_dicts, description=None):
    """A parser with a `--name value` flag for every default, plus `--seed`."""
    parser = argparse.ArgumentParser(description=description)
    add_dict_to_argparser(parser, {k: v for d in default_dicts for k, v in d.items()})
    parser.add_argument(
        "--seed", type=int, default=None,
        help="sample i depends only on (seed, i): the same images whatever the ranks, batch size or restarts",
    )
    return parser


def start(parser, argv=None, embedded=None):
    """Parse and check the flags and set up logging; returns (args, names of the flags given explicitly).

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
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive (got {getattr(args, name)})")
    if args.grid_size < 0:
        raise UsageError(f"--grid_size must be 0 (no grid) or more (got {args.grid_size})")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be 0 or more (got {args.seed})")
    if args.labels not in ("random", "cycle"):
        raise UsageError(f"--labels must be random or cycle (got {args.labels!r})")
    if args.eta and not args.use_ddim:
        raise UsageError("--eta is DDIM's noise level: add --use_ddim True")
    if args.autocast and args.autocast not in _AUTOCAST_DTYPES:
        raise UsageError(f"--autocast must be bf16, fp16 or empty for float32 (got {args.autocast!r})")
    _configure_logging(args)
    return args, explicit


def _configure_logging(args):
    """Log to the output folder: --output's, else $OPENAI_LOGDIR, else a new temporary one (rank 0's)."""
    directory = (os.path.dirname(args.output) or ".") if args.output.endswith(".npz") else args.output
    directory = directory or os.getenv("OPENAI_LOGDIR") or _broadcast(tempfile.mkdtemp(prefix="openai-") if dist.get_rank() == 0 else None)
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {directory}: {e.strerror or e}") from e
    logger.configure(dir=directory)


def run_script(main):
    """Run a script's main() in a process group; a failure on any rank ends every rank with one line from rank 0.

    Bad input exits with status 2 and no traceback; anything else prints its traceback on the
    rank where it happened and exits with status 1.
    """
    dist_util.setup_dist()
    if dist.get_world_size() > 1 and not th.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        th.set_num_threads(max(1, len(os.sched_getaffinity(0)) // dist.get_world_size()))  # ranks share the cores
    status = 0
    try:
        try:
            main()
        except _Failed:
            raise
        except Exception as e:  # outside a collective: the other ranks wait in one, or fail here too
            _agree(_failure(e))
    except _Failed as e:
        status = e.status
        if dist.get_rank() == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    finally:
        dist.destroy_process_group()
    sys.exit(status)


class _Failed(Exception):
    """A failure that every rank has learnt of, with the exit status it calls for."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _failure(e):
    """(exit status, one-line message) for an exception on this rank; a bug's traceback is printed here."""
    if isinstance(e, UsageError):
        return 2, str(e)
    traceback.print_exc()
    return 1, f"{type(e).__name__}: {e}"


def _agree(failure):
    """Share this rank's failure (or None) with all ranks; raise _Failed on every rank if any failed."""
    comm = dist_util.mpi_comm()
    failures = comm.allgather(failure) if comm else [failure]
    for rank, found in enumerate(failures):
        if found:
            status, message = found
            raise _Failed(status, message if rank == 0 else f"(rank {rank}) {message}")


class Checkpoint:
    """A checkpoint named by a flag (e.g. --model_path), with the flags of the network it holds.

    :param kind: "model", "sr" or "classifier" (as in `checkpoints.OFFICIAL`).
    :param defaults: the script's defaults for this network's flags.
    """

    def __init__(self, args, explicit, flag, kind, defaults):
        self.flag, self.kind, self.path, self.args = f"--{flag}", kind, getattr(args, flag), args
        if not self.path:
            raise UsageError(f"{self.flag} is required: a checkpoint file (official ones: python models/download.py NAME)")
        self.state_dict = dist_util.load_model_state_dict(self.path, map_location="cpu")
        self.flags = dict(defaults)
        self.flags.update(self._own_flags())
        self.flags.update({k: getattr(args, k) for k in explicit if k in self.flags})

    def _own_flags(self):
        """The flags the checkpoint carries: its sidecar's, else those of the official checkpoint it matches."""
        sidecar, source = read_sidecar(self.path), f"{self.path}.json"
        if sidecar is not None:
            flag_string, kind = sidecar["flags"], sidecar.get("kind", self.kind)
            if kind != self.kind:
                raise UsageError(f"{self.flag} {self.path} is a {_KIND_NAMES.get(kind, kind)} (says {source}), not a {_KIND_NAMES[self.kind]}")
        else:
            names = identify(self.state_dict)
            if not names:
                return {}
            kind, flag_string = OFFICIAL[names[0]]
            if kind != self.kind:
                raise UsageError(f"{self.flag} {self.path} is the official {names[0]}, a {_KIND_NAMES[kind]}, not a {_KIND_NAMES[self.kind]}")
            source = f"the official {' / '.join(names)}"
        try:
            values = parse_flags(flag_string, DEFAULTS[self.kind]())
        except UsageError as e:
            raise UsageError(f"flags of {self.path} from {source}: {e}") from e
        logger.log(f"{self.flag}: flags from {source}")
        return {name[2:]: values[name[2:]] for name in shlex.split(flag_string)[::2] if name[2:] in self.flags}

    def check_matches(self, other, *names):
        """Raise if this network and another disagree on any of the named flags (e.g. image_size)."""
        for name in names:
            if self.flags[name] != other.flags[name]:
                raise UsageError(
                    f"{self.flag} {self.path} has {name} {self.flags[name]} but {other.flag} {other.path} "
                    f"has {other.flags[name]}: they must match"
                )

    def load(self):
        """(network on this rank's device in eval mode, its diffusion or None for a classifier)."""
        flags = self.flags
        if self.kind != "classifier":
            try:
                space_timesteps(flags["diffusion_steps"], flags["timestep_respacing"] or [flags["diffusion_steps"]])
            except ValueError as e:
                raise UsageError(f"--timestep_respacing {flags['timestep_respacing']!r} cannot be made from {flags['diffusion_steps']} steps: {e}") from e
        try:
            if self.kind == "classifier":
                net, diffusion = create_classifier(**{k: flags[k] for k in classifier_defaults()}), None
            else:
                net, diffusion = (create_model_and_diffusion if self.kind == "model" else sr_create_model_and_diffusion)(**flags)
        except UsageError:
            raise
        except (ValueError, AssertionError) as e:
            raise UsageError(f"the flags for {self.flag} {self.path} do not make a network: {e or type(e).__name__}") from e
        message = mismatch_message(net, self.state_dict, self.path)
        if message:
            raise UsageError(message)
        net.load_state_dict(self.state_dict)
        del self.state_dict
        net.to(dist_util.dev())
        use_fp16 = flags.get("use_fp16", flags.get("classifier_use_fp16"))
        if use_fp16 and self.args.autocast:
            logger.log(f"{self.flag}: --autocast {self.args.autocast} in place of use_fp16's conversion")
        else:
            use_fp16_if_supported(net, use_fp16, dist_util.dev())
        return speed_up(net.eval(), self.args.autocast, self.args.channels_last, self.args.compile), diffusion


def speed_up(net, autocast="", channels_last=False, compile=False):
    """The network with the speed options applied: autocast ("", "bf16", "fp16"), channels_last, torch.compile."""
    if autocast or channels_last:
        net = _Fast(net, _AUTOCAST_DTYPES.get(autocast), channels_last)
    return th.compile(net) if compile else net


class _Fast(nn.Module):
    """A network run under autocast and/or on channels_last inputs; it returns float32 in the standard layout.

    The diffusion arithmetic after it (x0 from eps, posterior means, guidance) stays float32.
    """

    def __init__(self, net, autocast_dtype, channels_last):
        super().__init__()
        self.net = net.to(memory_format=th.channels_last) if channels_last else net
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last

    def forward(self, x, timesteps, **kwargs):
        dtype = x.dtype
        if self.channels_last:
            x = x.contiguous(memory_format=th.channels_last)
        autocast = th.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with autocast:
            out = self.net(x, timesteps, **kwargs)
        return out.to(dtype, memory_format=th.contiguous_format)


def label_aware(model, class_cond):
    """The model as the loops call it: labels y reach it only when it is class-conditional."""

    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, y=y if class_cond else None, **kwargs)

    return model_fn


def classifier_guidance(classifier, scale):
    """ADM's cond_fn: scale * d/dx log softmax(classifier(x_t, t))[y]."""

    def cond_fn(x, t, y=None, **kwargs):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def per_sample(fn):
    """fn(x, t, **kwargs) evaluated one sample at a time, so a sample's result never depends on its batch."""

    def call(x, t, **kwargs):
        return th.cat([fn(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()}) for i in range(len(x))])

    return call


class BaseSamples:
    """The low-resolution images (and labels) of an .npz that a super-resolution model upsamples."""

    def __init__(self, path, small_size, num_classes=None):
        """:param num_classes: the upsampler's classes when it is class-conditional (labels are then required)."""
        if not path:
            raise UsageError("--base_samples is required: an .npz of low-resolution samples (arr_0) and their labels (arr_1)")
        try:
            with np.load(path) as data:
                self.images = data["arr_0"]
                self.labels = data["arr_1"] if "arr_1" in data.files else None
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot read --base_samples {path}: expected an .npz with arr_0 images ({e})") from e
        shape = self.images.shape
        if self.images.dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or not len(self.images):
            raise UsageError(f"--base_samples {path} holds arr_0 {self.images.dtype} {list(shape)}: expected uint8 [N, H, W, 3] images")
        if shape[1:3] != (small_size, small_size):
            raise UsageError(f"--base_samples {path} holds {shape[1]}x{shape[2]} images but the upsampler takes {small_size}x{small_size} (--small_size)")
        if self.labels is None and num_classes:
            raise UsageError(f"--base_samples {path} has no labels (arr_1) but the upsampler is class-conditional")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise UsageError(f"--base_samples {path}: arr_1 has shape {list(self.labels.shape)} but there are {len(self.images)} images")
        if num_classes and not ((self.labels >= 0) & (self.labels < num_classes)).all():
            raise UsageError(f"--base_samples {path} has labels outside 0..{num_classes - 1}, the upsampler's classes")

    def __len__(self):
        return len(self.images)

    def inputs(self, indices):
        """model_kwargs for samples `indices` (cycling through the base samples): low_res in [-1, 1] NCHW, y."""
        rows = np.asarray(indices) % len(self)
        kwargs = {"low_res": th.from_numpy(self.images[rows]).float().div(127.5).sub(1).permute(0, 3, 1, 2)}
        if self.labels is not None:
            kwargs["y"] = th.from_numpy(self.labels[rows].astype(np.int64))
        return kwargs


@dataclass
class Task:
    """What to sample: the process, the networks as the loops call them, and each sample's inputs.

    :param shape: (C, H, W) of one sample.
    :param num_classes: draw each sample's label y uniformly from range(num_classes) (None: no labels).
    :param inputs: indices -> dict of per-sample model_kwargs (CPU tensors), e.g. low_res and y.
    :param stats_path: where to write the PixelAsParam step statistics as JSON ("" for nowhere).
    """

    diffusion: object
    model: Callable
    shape: tuple
    num_classes: Optional[int] = None
    cond_fn: Optional[Callable] = None
    cfg: Optional[ClassifierFree] = None
    inputs: Optional[Callable] = None
    stats_path: str = ""


class Output:
    """Where a run's files go: the samples .npz, its PNG grid and the folder of saved batches."""

    def __init__(self, args, num_samples, image_size):
        self.num_samples = num_samples
        name = f"samples_{num_samples}x{image_size}x{image_size}x3.npz"
        self.path = args.output if args.output.endswith(".npz") else os.path.join(logger.get_dir(), name)
        self.grid = self.path[: -len(".npz")] + ".png"
        self.partial = self.path[: -len(".npz")] + ".partial"

    def finished(self):
        """Whether the samples are already there (rank 0 looks, and says where): a finished run is not redone."""
        done = _collective(lambda: dist.get_rank() == 0 and os.path.exists(self.path), broadcast=True)
        if done and dist.get_rank() == 0:
            print(f"already sampled: {self.path} (delete it to sample again)")
        return done


def sample(args, task, out):
    """Make the samples not yet saved, each rank one batch a round, and write the results on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = _Progress(out.partial, {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_IN_FINGERPRINT})
    saved = _collective(lambda: progress.open() if rank == 0 else None, broadcast=True)
    todo = [i for i in range(out.num_samples) if i not in saved]
    batches = [list(group) for _, group in itertools.groupby(todo, key=lambda i: i // args.batch_size)]
    logger.log(f"sampling {len(todo)} of {out.num_samples} samples on {world} rank(s) ({len(saved)} already saved in {out.partial})")
    started = time.time()
    with tqdm(total=out.num_samples, initial=len(saved), unit="sample", disable=rank != 0) as bar:
        for first in range(0, len(batches), world):
            mine = batches[first + rank] if first + rank < len(batches) else None
            results = _collective(lambda: mine and _sample_batch(args, task, mine))
            if rank == 0:
                for result in filter(None, results):
                    progress.save(result)
                    bar.update(len(result["index"]))
    if todo:
        seconds = time.time() - started
        logger.log(f"made {len(todo)} samples in {seconds:.1f} s ({len(todo) / seconds:.2f} samples/s)")
    _collective(lambda: rank == 0 and _finish(args, task, out, progress), broadcast=True)


def _collective(fn, broadcast=False):
    """fn() on every rank, then a failure on any rank is raised on all (see run_script).

    Python objects travel over MPI, as in ADM: torch.distributed's object collectives leave
    tensors in gloo's threads that can abort the interpreter when it exits right after.

    Returns rank 0's value on every rank when broadcast, else every rank's value on rank 0 (None elsewhere).
    """
    try:
        value, failure = fn(), None
    except Exception as e:  # every rank must learn of it, or the others would wait forever
        value, failure = None, _failure(e)
    _agree(failure)
    if broadcast:
        return _broadcast(value)
    comm = dist_util.mpi_comm()
    return comm.gather(value, root=0) if comm else [value]


def _broadcast(value):
    """Rank 0's value, on every rank."""
    comm = dist_util.mpi_comm()
    return comm.bcast(value, root=0) if comm else value


def _sample_seed(seed, index, stream):
    """A well-mixed 63-bit seed for one random stream of one sample."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _sample_batch(args, task, indices):
    """Sample the given indices; returns their uint8 NHWC images, labels and PixelAsParam statistics."""
    device, n = dist_util.dev(), len(indices)
    model_kwargs = task.inputs(indices) if task.inputs else {}
    if task.num_classes:
        if args.labels == "cycle":
            model_kwargs["y"] = th.as_tensor(indices) % task.num_classes
        elif args.seed is None:
            model_kwargs["y"] = th.randint(task.num_classes, (n,))
        else:
            gens = [th.Generator().manual_seed(_sample_seed(args.seed, i, _LABEL_STREAM)) for i in indices]
            model_kwargs["y"] = th.cat([th.randint(task.num_classes, (1,), generator=g) for g in gens])
    model_kwargs = {k: v.to(device) for k, v in model_kwargs.items()}
    model, cond_fn, cfg, noise, step_noise = task.model, task.cond_fn, task.cfg, None, None
    if args.seed is not None:
        gens = [th.Generator().manual_seed(_sample_seed(args.seed, i, _NOISE_STREAM)) for i in indices]

        def draw(_step=None):
            return th.stack([th.randn(task.shape, generator=g) for g in gens]).to(device)

        noise, step_noise = draw(), draw  # x_T, then one z per step, from each sample's generator
        if args.batch_invariant:
            model, cond_fn = per_sample(model), cond_fn and per_sample(cond_fn)
            cfg = cfg and ClassifierFree(per_sample(cfg.cond_model), cfg.scale)
    diffusion = task.diffusion
    loop = diffusion.ddim_sample_loop_progressive if args.use_ddim else diffusion.p_sample_loop_progressive
    steps = loop(
        model, (n, *task.shape), noise=noise, clip_denoised=args.clip_denoised, cond_fn=cond_fn,
        model_kwargs=model_kwargs, device=device, step_noise=step_noise, cfg=cfg,
        **(dict(eta=args.eta) if args.use_ddim else {}),
    )
    stats, total = StepStats(), diffusion.num_timesteps
    for step, out in enumerate(steps, 1):
        finite = th.isfinite(out["sample"]).flatten(1).all(dim=1)
        if not finite.all():
            bad = [indices[k] for k in (~finite).nonzero().flatten().tolist()]
            raise UsageError(
                f"NaN or infinite values at sampling step {step} of {total} (timestep index {total - step}) in "
                f"sample(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}: check the checkpoint, flags and guidance scale"
            )
        if "pxp" in out:
            stats.add(total - step, out["pxp"])
    images = ((out["sample"] + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1)
    labels = model_kwargs["y"].cpu().numpy().astype(np.int64) if "y" in model_kwargs else None
    return {"index": np.asarray(indices, dtype=np.int64), "images": images.cpu().numpy(), "labels": labels, "stats": stats}


def _atomic_savez(path, **arrays):
    """np.savez to a temporary file, then rename it to path: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """An unfinished run (rank 0): its flags in `run.json` and one `from_<first index>.npz` per saved batch."""

    def __init__(self, path, fingerprint):
        self.path, self.fingerprint = path, fingerprint

    def open(self):
        """The indices already saved; raises if the folder belongs to a run with other flags."""
        run_file = os.path.join(self.path, "run.json")
        if not os.path.exists(run_file):
            os.makedirs(self.path, exist_ok=True)
            with open(f"{run_file}.tmp", "w") as f:
                json.dump(self.fingerprint, f, indent=1)
            os.replace(f"{run_file}.tmp", run_file)
            return set()
        with open(run_file) as f:
            previous = json.load(f)
        changed = [f"--{k} {previous.get(k)} (now {v})" for k, v in self.fingerprint.items() if previous.get(k) != v]
        if changed:
            raise UsageError(
                f"{self.path} holds an unfinished run with other flags ({', '.join(changed)}): "
                "run the same command to finish it, or delete that folder"
            )
        return {int(i) for batch in self._batches() for i in batch["index"]}

    def _batches(self):
        """The saved batches, in order of their first index."""
        for name in sorted(n for n in os.listdir(self.path) if n.startswith("from_") and n.endswith(".npz")):
            try:
                with np.load(os.path.join(self.path, name)) as data:
                    yield {k: data[k] for k in data.files}
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read {os.path.join(self.path, name)} ({e}): delete it to sample that batch again") from e

    def save(self, result):
        """Save one batch atomically."""
        arrays = dict(index=result["index"], images=result["images"], stats=np.array(json.dumps(_stats_state(result["stats"]))))
        if result["labels"] is not None:
            arrays["labels"] = result["labels"]
        _atomic_savez(os.path.join(self.path, f"from_{result['index'][0]:09d}.npz"), **arrays)

    def collect(self, num_samples):
        """(images, labels or None, StepStats) of all saved batches, ordered by sample index."""
        images, labels, stats, seen = None, None, StepStats(), np.zeros(num_samples, dtype=np.int64)
        for batch in self._batches():
            index = batch["index"]
            if images is None:
                images = np.empty((num_samples, *batch["images"].shape[1:]), dtype=np.uint8)
                labels = np.empty(num_samples, dtype=np.int64) if "labels" in batch else None
            images[index] = batch["images"]
            if labels is not None:
                labels[index] = batch["labels"]
            stats.merge(_stats_from_state(json.loads(str(batch["stats"]))))
            np.add.at(seen, index, 1)
        if not (seen == 1).all():
            raise UsageError(f"{self.path} does not hold each sample exactly once: delete it and sample again")
        return images, labels, stats


def _stats_state(stats):
    """A StepStats as JSON-ready sums and counts."""
    return {"sums": {str(t): s for t, s in stats.sums.items()}, "counts": {str(t): c for t, c in stats.counts.items()}}


def _stats_from_state(state):
    """The StepStats that `_stats_state` described."""
    stats = StepStats()
    stats.sums = {int(t): s for t, s in state["sums"].items()}
    stats.counts = {int(t): c for t, c in state["counts"].items()}
    return stats


def _finish(args, task, out, progress):
    """Write the grid, the statistics and then the samples (the run is finished once they exist)."""
    images, labels, stats = progress.collect(out.num_samples)
    if args.grid_size:
        save_grid(images, args.grid_size, out.grid)
        logger.log(f"grid of the first samples: {out.grid}")
    if task.stats_path:
        _write_stats(stats.to_dict(), task.stats_path)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    _atomic_savez(out.path, **arrays)
    shutil.rmtree(progress.path)
    logger.log(f"saved {len(images)} samples to {out.path}")


def _write_stats(stats_dict, path):
    """The PixelAsParam step statistics as JSON, and a plot beside it when matplotlib is installed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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


def save_grid(images, grid_size, path, min_tile=64):
    """Tile the first grid_size x grid_size images of a uint8 NHWC array (fewer rows if fewer) into a PNG.

    Images smaller than min_tile pixels are enlarged by an integer factor (nearest neighbour),
    so that 8x8 digits are big enough to look at.
    """
    from PIL import Image

    n = min(len(images), grid_size * grid_size)
    cols = min(grid_size, n)
    rows = -(-n // cols)
    zoom = max(1, min_tile // images.shape[1])
    tiles = images[:n].repeat(zoom, axis=1).repeat(zoom, axis=2)
    height, width = tiles.shape[1:3]
    canvas = np.zeros((rows * height, cols * width, 3), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * height : (r + 1) * height, c * width : (c + 1) * width] = tiles[k]
    Image.fromarray(canvas).save(path)
