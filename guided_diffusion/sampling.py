"""The sampling engine: samples seeded by their index, made in batches spread over the MPI ranks, each batch saved as made.

Samples 0..N-1 are cut into batches of `--batch_size` by index, planned lazily. In each round
every rank takes one batch; rank 0 gathers the round and saves it in the run's progress folder
(`sampling_progress`). Started again with the same settings, a run skips the saved samples;
when all are there rank 0 writes the output (`sampling_output`). With `--seed S`, sample i
draws its label, x_T and every step's noise from its own generators seeded by (S, i), and the
networks see one sample at a time (`--batch_invariant True`, since batched kernels round
differently with the batch size), so the images depend on neither the number of ranks, the
batch size nor interruptions.
"""

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch as th
import torch.distributed as dist
from tqdm.auto import tqdm

from . import dist_util, harness, logger
from .errors import UsageError
from .pixel_as_param import ClassifierFree, StepStats
from .sampling_flags import parse_labels
from .sampling_networks import per_sample

_LABEL_STREAM, _NOISE_STREAM = 0, 1


@dataclass
class Task:
    """What to sample: the process, the networks as the loops call them, and each sample's inputs.

    :param shape: (C, H, W) of one sample.
    :param num_classes: the classes of each sample's label y, chosen by --labels (None: no labels drawn).
    :param inputs: indices -> dict of per-sample model_kwargs (CPU tensors), e.g. low_res and y.
    :param input_labels: whether `inputs` gives each sample's label y (then it is saved with the sample).
    :param stats_path: where to write the PixelAsParam step statistics as JSON ("" for nowhere).
    """

    diffusion: object
    model: Callable
    shape: tuple
    num_classes: Optional[int] = None
    cond_fn: Optional[Callable] = None
    cfg: Optional[ClassifierFree] = None
    inputs: Optional[Callable] = None
    input_labels: bool = False
    stats_path: str = ""


def sample(args, task, out):
    """Make the samples not yet saved, each rank one batch a round, then write the output on rank 0.

    `out` must have been claimed (`Output.claim`). Ctrl-C ends the run with one line saying how
    many samples are saved and where (the same command continues).
    """
    rank, world, num_samples = dist.get_rank(), dist.get_world_size(), out.num_samples
    _check_labels(parse_labels(args.labels), task)
    layout = (task.shape[1], task.shape[2], task.shape[0])
    labelled = bool(task.num_classes) or task.input_labels
    packed = harness.collective(lambda: rank == 0 and np.packbits(out.progress.open(num_samples, layout, labelled)), broadcast=True)
    saved = np.unpackbits(packed, count=num_samples).astype(bool)
    todo = num_samples - np.count_nonzero(saved)
    logger.log(f"sampling {todo} of {num_samples} samples on {world} rank(s) ({num_samples - todo} already saved in {out.partial})")
    batches, started = _plan(saved, args.batch_size), time.time()
    try:
        with tqdm(total=num_samples, initial=num_samples - todo, unit="sample", disable=rank != 0) as bar:
            while round_ := list(itertools.islice(batches, world)):
                mine = round_[rank] if rank < len(round_) else None
                results = harness.collective(lambda: mine is not None and _sample_batch(args, task, mine))
                for result in filter(None, results or []):
                    out.progress.save(result)
                    bar.update(len(result["index"]))
        if todo:
            seconds = time.time() - started
            logger.log(f"made {todo} samples in {seconds:.1f} s ({todo / seconds:.2f} samples/s)")
        harness.collective(lambda: rank == 0 and out.write(args.grid_size, task.stats_path), broadcast=True)
    except KeyboardInterrupt:
        if rank != 0:
            raise
        kept = 0 if out.progress.saved is None else np.count_nonzero(out.progress.saved)
        raise harness.Interrupted(f"{kept} of {num_samples} samples are saved in {out.partial}: run the same command to continue") from None


def _check_labels(labels, task):
    """Raise UsageError if a --labels list cannot be given to this task's samples."""
    if not isinstance(labels, tuple):
        return
    if not task.num_classes:
        raise UsageError(f"--labels {','.join(map(str, labels))}: these samples take no class labels of their own (use random)")
    if max(labels) >= task.num_classes:
        raise UsageError(f"--labels: class {max(labels)} is not one of the {task.num_classes} classes (0..{task.num_classes - 1})")


def _plan(saved, batch_size):
    """The batches of unsaved indices, made lazily: those of [0, B), then [B, 2B), ... (never a list of all indices)."""
    for start in range(0, len(saved), batch_size):
        todo = start + np.flatnonzero(~saved[start : start + batch_size])
        if len(todo):
            yield todo.tolist()


def _sample_seed(seed, index, stream):
    """A well-mixed 63-bit seed for one random stream of one sample."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _sample_batch(args, task, indices):
    """Sample the given indices; returns their uint8 NHWC images, labels and PixelAsParam statistics."""
    device, n = dist_util.dev(), len(indices)
    model_kwargs = task.inputs(indices) if task.inputs else {}
    labels = parse_labels(args.labels)
    if task.num_classes:
        if isinstance(labels, tuple):
            model_kwargs["y"] = th.as_tensor([labels[i % len(labels)] for i in indices])
        elif labels == "cycle":
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
    steps = diffusion.sample_loop_progressive(
        args.sampler, model, (n, *task.shape), eta=args.eta, x0_threshold=args.x0_threshold, noise=noise,
        clip_denoised=args.clip_denoised, cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, step_noise=step_noise, cfg=cfg,
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
