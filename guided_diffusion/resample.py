"""Timestep samplers for training: uniform, or loss-aware importance sampling."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

from .errors import UsageError


def create_named_schedule_sampler(name, diffusion):
    """A sampler by flag name: `uniform` or `loss-second-moment`."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise UsageError(f"unknown schedule sampler {name!r}: use uniform or loss-second-moment")


class ScheduleSampler(ABC):
    """A distribution over timesteps, with importance weights that keep the loss unbiased."""

    @abstractmethod
    def weights(self):
        """Unnormalised non-negative weights, one per timestep."""

    def sample(self, batch_size, device):
        """Draw timesteps for a batch; returns (timesteps, weights to scale each loss by)."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights = th.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that learns from the losses it sees."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather every rank's (timestep, loss) pairs and update with all of them (collective)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        batch_sizes = [th.tensor([0], dtype=th.int32, device=local_ts.device) for _ in range(dist.get_world_size())]
        dist.all_gather(batch_sizes, th.tensor([len(local_ts)], dtype=th.int32, device=local_ts.device))
        batch_sizes = [x.item() for x in batch_sizes]
        max_bs = max(batch_sizes)
        # all_gather needs equal shapes: pad to the largest batch, then trim
        timestep_batches = [th.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [th.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        dist.all_gather(timestep_batches, th.nn.functional.pad(local_ts, (0, max_bs - len(local_ts))))
        dist.all_gather(loss_batches, th.nn.functional.pad(local_losses, (0, max_bs - len(local_losses))))
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from the losses of all ranks (identical on every rank)."""


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t proportionally to sqrt(E[loss_t^2]) once every t has `history_per_term` losses."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=int)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]  # drop the oldest
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
