"""The diffusion training loop: data-parallel over ranks, mixed precision, EMA, resumable."""

import copy
import functools
import glob
import os
import re

import blobfile as bf
import torch as th
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler


class TrainLoop:
    """Train `model` on batches from `data` with `diffusion.training_losses`.

    Checkpoints (`modelNNNNNN.pt`, `optNNNNNN.pt`, `ema_<rate>_NNNNNN.pt`) go to the log
    directory every `save_interval` steps, written atomically; with no `resume_checkpoint`
    the loop resumes from the newest model checkpoint already there.
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
        self.resume_checkpoint = resume_checkpoint or find_resume_checkpoint(get_blob_logdir())
        self.use_fp16 = use_fp16 and th.cuda.is_available()
        if use_fp16 and not self.use_fp16:
            logger.log("use_fp16: no CUDA device, training in float32")
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps

        self.step = 0
        self.resume_step = 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.global_batch = self.batch_size * self.world_size

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(model=self.model, use_fp16=self.use_fp16, fp16_scale_growth=fp16_scale_growth)
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        if self.resume_step:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]

        if self.world_size > 1:
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
        opt_checkpoint = bf.join(bf.dirname(self.resume_checkpoint), f"opt{self.resume_step:06}.pt")
        if bf.exists(opt_checkpoint):
            with bf.BlobFile(opt_checkpoint, "rb") as f:
                self.opt.load_state_dict(th.load(f, map_location=dist_util.dev(), weights_only=True))

    def run_loop(self):
        """Train until lr_anneal_steps (forever when 0), logging and saving on schedule."""
        while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            if self.step % self.log_interval == 0:
                logger.dumpkvs()
            if self.step % self.save_interval == 0:
                self.save()
                if os.environ.get("DIFFUSION_TRAINING_TEST", "") and self.step > 0:
                    return
            self.step += 1
        if (self.step - 1) % self.save_interval != 0:
            self.save()

    def run_step(self, batch, cond):
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            for rate, params in zip(self.ema_rate, self.ema_params):
                update_ema(params, self.mp_trainer.master_params, rate=rate)
        self._anneal_lr()
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step + 1) * self.global_batch)

    def forward_backward(self, batch, cond):
        """Accumulate gradients over microbatches (DDP syncs on the last one only)."""
        self.mp_trainer.zero_grad()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()}
            last_batch = i + self.microbatch >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
            compute_losses = functools.partial(self.diffusion.training_losses, self.ddp_model, micro, t, model_kwargs=micro_cond)
            if last_batch or self.ddp_model is self.model:
                losses = compute_losses()
            else:
                with self.ddp_model.no_sync():
                    losses = compute_losses()
            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            self.mp_trainer.backward(loss)

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        for param_group in self.opt.param_groups:
            param_group["lr"] = self.lr * (1 - frac_done)

    def save(self):
        """Write the model, EMA and optimizer checkpoints of this step (rank 0, atomically)."""
        step = self.step + self.resume_step
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_atomically(self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params), f"model{step:06d}.pt")
            for rate, params in zip(self.ema_rate, self.ema_params):
                save_atomically(self.mp_trainer.master_params_to_state_dict(params), f"ema_{rate}_{step:06d}.pt")
            save_atomically(self.opt.state_dict(), f"opt{step:06d}.pt")
            logger.log(f"saved checkpoints of step {step}")
        if dist.is_initialized():
            dist.barrier()


def save_atomically(obj, filename, directory=None):
    """torch.save obj to directory/filename through a temporary file, so a kill never leaves half a file."""
    path = bf.join(directory or get_blob_logdir(), filename)
    tmp_path = f"{path}.tmp"
    with bf.BlobFile(tmp_path, "wb") as f:
        th.save(obj, f)
    os.replace(tmp_path, path)


def parse_resume_step_from_filename(filename):
    """The step in a name like path/to/model012345.pt (0 if there is none)."""
    match = re.search(r"(\d+)\.pt$", bf.basename(filename))
    return int(match.group(1)) if match else 0


def find_resume_checkpoint(directory):
    """The newest `modelNNNNNN.pt` in directory, or None."""
    candidates = glob.glob(os.path.join(directory, "model[0-9]*.pt"))
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
