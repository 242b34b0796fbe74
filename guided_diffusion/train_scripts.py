"""What the training scripts (and image_nll.py) share: training flags, the log folder of all ranks, the hand-over to TrainLoop.

They run under the scripts' harness (`harness.run_script`: one-line errors, Ctrl-C) and write
checkpoints with sidecars (`checkpoints.make_sidecar`), so that the sampling scripts need no flags.
"""

from . import dist_util, harness, logger
from .checkpoints import DEFAULTS, parse_flags, sidecar_flags
from .resample import create_named_schedule_sampler
from .train_util import TrainLoop


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


def setup():
    """Log to one folder for all ranks ($OPENAI_LOGDIR or rank 0's choice).

    Logged values are averaged over the ranks; checkpoints go to that folder, which is also
    where a rerun of the same command finds them to resume.
    """
    logger.configure(dir=harness.collective(logger.default_dir, broadcast=True), comm=dist_util.mpi_comm())


def train(args, model, diffusion, data, sidecar, loop_class=TrainLoop, **overrides):
    """Train model with the loop flags in args (overrides replace or add loop arguments)."""
    model.to(dist_util.dev())
    names = ("batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval", "resume_checkpoint")
    names += ("use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps")
    kwargs = {k: getattr(args, k) for k in names if hasattr(args, k)}
    kwargs.update(schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion), sidecar=sidecar)
    kwargs.update(overrides)
    logger.log("training...")
    try:
        loop_class(model=model, diffusion=diffusion, data=data, **kwargs).run_loop()
    except KeyboardInterrupt:
        raise harness.Interrupted(f"the checkpoints saved so far are in {logger.get_dir()}; with OPENAI_LOGDIR={logger.get_dir()} the same command resumes") from None
    logger.log(f"done: checkpoints in {logger.get_dir()}")
