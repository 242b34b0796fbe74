"""The diffusion training loop: data-parallel over ranks, mixed precision, EMA, resumable."""

import copy
import functools
import glob
import os

import blobfile as bf
import torch as th
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .checkpoints import write_sidecar
from .errors import UsageError
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer  # noqa: F401 (upstream's name here too)
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler


class TrainLoop:
    """Train `model` on batches from `data` with `diffusion.training_losses`.

    Checkpoints (`modelNNNNNN.pt`, `optNNNNNN.pt`, `ema_<rate>_NNNNNN.pt`, the state after
    NNNNNN steps) go to the log directory every `save_interval` steps, written atomically, the
    model file last; with no `resume_checkpoint` the loop resumes from the newest model
    checkpoint already there (see find_resume_checkpoint). `sidecar` ({"kind", "flags"}) is written as `<checkpoint>.json`
    beside the model and EMA checkpoints, so that they load without flags.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        sidecar=None,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = [ema_rate] if isinstance(ema_rate, float) else [float(x) for x in str(ema_rate).split(",")]
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint or find_resume_checkpoint()
        self.use_fp16 = use_fp16 and th.cuda.is_available()
        if use_fp16 and not self.use_fp16:
            logger.log("use_fp16: no CUDA device, training in float32")
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.sidecar = sidecar

        self.step = 0
        self.resume_step = 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.global_batch = self.batch_size * self.world_size
        self.sync_cuda = th.cuda.is_available()

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(model=self.model, use_fp16=self.use_fp16, fp16_scale_growth=fp16_scale_growth)
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        if self.resume_step:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]

        self.use_ddp = self.world_size > 1  # on CPUs too, over gloo
        if self.use_ddp:
            device_ids = [dist_util.dev()] if th.cuda.is_available() else None
            self.ddp_model = DDP(self.model, device_ids=device_ids, broadcast_buffers=False, bucket_cap_mb=128)
        else:
            self.ddp_model = self.model

    def _load_and_sync_parameters(self):
        if self.resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(self.resume_checkpoint)
            logger.log(f"resuming from {self.resume_checkpoint} (step {self.resume_step})")
            self.model.load_state_dict(dist_util.load_state_dict(self.resume_checkpoint, map_location=dist_util.dev()))
        if dist.is_initialized():
            dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        ema_checkpoint = find_ema_checkpoint(self.resume_checkpoint, self.resume_step, rate)
        if ema_checkpoint:
            state_dict = dist_util.load_state_dict(ema_checkpoint, map_location=dist_util.dev())
            ema_params = self.mp_trainer.state_dict_to_master_params(state_dict)
        if dist.is_initialized():
            dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self):
        """Restore the optimizer from the `optNNNNNN.pt` beside the resumed checkpoint, if there is one."""
        opt_checkpoint = bf.join(bf.dirname(self.resume_checkpoint), f"opt{self.resume_step:06}.pt")
        if not bf.exists(opt_checkpoint):
            return
        try:
            state_dict = dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev())
        except UsageError as e:
            raise UsageError(f"{e}; or delete it to resume with a fresh optimizer state") from None
        try:
            self.opt.load_state_dict(state_dict)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"optimizer state {opt_checkpoint} does not fit this model's optimizer ({reason}): "
                "resume from a checkpoint of this model, or delete it to resume with a fresh optimizer state"
            ) from None

    @property
    def global_step(self):
        """Steps taken so far, counting those before the resumed checkpoint."""
        return self.step + self.resume_step

    def run_loop(self):
        """Train until lr_anneal_steps steps in all (forever when 0), logging and saving on schedule.

        A run that already reached lr_anneal_steps does nothing; `DIFFUSION_TRAINING_TEST`
        stops after the first save.
        """
        while not self.lr_anneal_steps or self.global_step < self.lr_anneal_steps:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            if self.global_step % self.log_interval == 0:
                logger.dumpkvs()
            if self.global_step % self.save_interval == 0:
                self.save()
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return
        if self.step and self.global_step % self.save_interval:
            self.save()

    def run_step(self, batch, cond):
        """One optimizer step on a batch, then the EMA update and the learning-rate annealing."""
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self._anneal_lr()
        self.log_step()

    def forward_backward(self, batch, cond):
        """Accumulate gradients over microbatches (DDP syncs on the last one only)."""
        self.mp_trainer.zero_grad()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()}
            last_batch = i + self.microbatch >= batch.shape[0]
            compute_loss = functools.partial(self.compute_loss, micro, micro_cond)
            if last_batch or not self.use_ddp:
                loss = compute_loss()
            else:
                with self.ddp_model.no_sync():
                    loss = compute_loss()
            self.mp_trainer.backward(loss)

    def compute_loss(self, micro, micro_cond):
        """The loss of one microbatch to backpropagate (the diffusion loss at sampled timesteps), logged."""
        t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
        losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
        return (losses["loss"] * weights).mean()

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        for param_group in self.opt.param_groups:
            param_group["lr"] = self.lr * (1 - frac_done)

    def log_step(self):
        """Log the steps taken, counting the one just done, and the samples seen over all ranks."""
        logger.logkv("step", self.global_step + 1)
        logger.logkv("samples", (self.global_step + 1) * self.global_batch)

    def save(self):
        """Write the EMA, optimizer and model checkpoints of this step (rank 0, atomically).

        The model file, which marks the step as resumable, comes last.
        """
        step = self.global_step
        if not dist.is_initialized() or dist.get_rank() == 0:
            for rate, params in zip(self.ema_rate, self.ema_params):
                self._save_network(params, f"ema_{rate}_{step:06d}.pt")
            save_atomically(self.opt.state_dict(), f"opt{step:06d}.pt")
            self._save_network(self.mp_trainer.master_params, f"model{step:06d}.pt")
            logger.log(f"saved checkpoints of step {step}")
        if dist.is_initialized():
            dist.barrier()

    def _save_network(self, params, filename):
        """Save a state dict with these parameters, preceded by its sidecar flags file."""
        if self.sidecar:
            write_sidecar(bf.join(get_blob_logdir(), filename), **self.sidecar)
        save_atomically(self.mp_trainer.master_params_to_state_dict(params), filename)


def save_atomically(obj, filename, directory=None):
    """torch.save obj to directory/filename through a temporary file, so a kill never leaves half a file."""
    path = bf.join(directory or get_blob_logdir(), filename)
    tmp_path = f"{path}.tmp"
    with bf.BlobFile(tmp_path, "wb") as f:
        th.save(obj, f)
    os.replace(tmp_path, path)


def parse_resume_step_from_filename(filename):
    """The step NNNNNN of a name like path/to/modelNNNNNN.pt (0 when the name has no such part)."""
    if "model" not in filename:
        return 0
    try:
        return int(filename.split("model")[-1].split(".")[0])
    except ValueError:
        return 0


def find_resume_checkpoint(directory=None):
    """The newest `modelNNNNNN.pt` in directory (default: the log directory), or None.

    Upstream's is a hook returning None, for users to replace; TrainLoop calls it with no
    argument, so a replacement of either form keeps working.
    """
    candidates = glob.glob(os.path.join(directory or get_blob_logdir(), "model[0-9]*.pt"))
    return max(candidates, key=parse_resume_step_from_filename) if candidates else None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """The EMA checkpoint saved beside main_checkpoint at step, if it exists."""
    if main_checkpoint is None:
        return None
    path = bf.join(bf.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if bf.exists(path) else None


def get_blob_logdir():
    """Where checkpoints go: the logger's directory."""
    return logger.get_dir()


def log_loss_dict(diffusion, ts, losses):
    """Log each loss's mean and its mean per quarter of the timestep range."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)
