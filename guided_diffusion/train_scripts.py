"""What the training scripts (and image_nll.py) share: flags, MPI and logger setup, the hand-over
to TrainLoop, sidecar flags for the checkpoints, and one-line reports of bad input."""

import argparse
import shlex
import sys

import torch.distributed as dist

from . import dist_util, logger
from .checkpoints import DEFAULTS, parse_flags, sidecar_flags
from .errors import UsageError
from .resample import create_named_schedule_sampler
from .script_util import add_dict_to_argparser
from .train_util import TrainLoop

# flags that choose how a network is sampled, not which network it is: kept out of sidecars
SAMPLING_FLAGS = ("timestep_respacing", "pxp_mode", "dweight", "cweight", "pxp_optimizer", "pxp_window")


def train_defaults():
    """The training-loop flags of image_train.py and super_res_train.py (the original's, plus random_flip)."""
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",  # comma-separated list of EMA rates
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        random_flip=True,  # mirror half of the training images (off for digits)
    )


def create_argparser(description, *default_dicts):
    """An argument parser with a `--name value` flag for every entry of the default dicts (later dicts win)."""
    parser = argparse.ArgumentParser(description=description)
    add_dict_to_argparser(parser, {k: v for defaults in default_dicts for k, v in defaults.items()})
    return parser


def parse_with_sidecar(parser, kind):
    """Parse flags, taking the network's from the sidecar of --model_path when it has one.

    Flags given on the command line still win over the sidecar's.
    """
    args = parser.parse_args()
    flag_string = sidecar_flags(args.model_path) if args.model_path else None
    if flag_string is None:
        return args
    parser.set_defaults(**parse_flags(flag_string, DEFAULTS[kind]()))
    return parser.parse_args()


def run(main):
    """Run a script's main(); bad input (UsageError) is printed as one line on stderr, exit status 2."""
    try:
        main()
    except UsageError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)


def setup():
    """Join the MPI ranks and log to one folder for all of them ($OPENAI_LOGDIR or rank 0's choice).

    Logged values are averaged over the ranks; checkpoints go to that folder, which is also
    where a rerun of the same command finds them to resume.
    """
    dist_util.setup_dist()
    logdir = [logger.default_dir()]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(logdir, src=0)
    logger.configure(dir=logdir[0], comm=dist_util.mpi_comm())


def make_sidecar(kind, args, defaults):
    """The sidecar of a checkpoint trained with args: its kind and the flags (of `defaults`) that build it."""
    names = [k for k in defaults if k not in SAMPLING_FLAGS]
    return dict(kind=kind, flags=" ".join(f"--{k} {shlex.quote(str(getattr(args, k)))}" for k in names))


def train(args, model, diffusion, data, sidecar, loop_class=TrainLoop, **overrides):
    """Train model with the loop flags in args (overrides replace or add loop arguments)."""
    model.to(dist_util.dev())
    names = ("batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval", "resume_checkpoint")
    names += ("use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps")
    kwargs = {k: getattr(args, k) for k in names if hasattr(args, k)}
    kwargs.update(schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion), sidecar=sidecar)
    kwargs.update(overrides)
    logger.log("training...")
    loop_class(model=model, diffusion=diffusion, data=data, **kwargs).run_loop()
    logger.log(f"done: checkpoints in {logger.get_dir()}")
