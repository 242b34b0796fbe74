"""Respacing: sampling with a subset of the original timesteps (`--timestep_respacing`)."""

import numpy as np
import torch as th

from .errors import UsageError

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    :param section_counts: a list of step counts, one per equal section of the process
        (e.g. [10, 15, 20]), or a comma-separated string of them; "ddimN" instead picks N
        evenly strided steps starting at 0, as in the DDIM paper.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise UsageError(f"cannot create exactly {desired_count} steps with an integer stride out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise UsageError(f"cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        position = 0.0  # accumulated (not multiplied) so rounding matches the reference exactly
        for _ in range(section_count):
            all_steps.append(start_idx + round(position))
            position += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that skips steps of a base process.

    :param use_timesteps: the original timesteps to keep.
    :param kwargs: the arguments of the base process (its `betas` included).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base_alphas_cumprod = np.cumprod(1.0 - np.asarray(kwargs["betas"], dtype=np.float64))
        last_alpha_cumprod = 1.0
        new_betas = []
        self.timestep_map = []
        for i, alpha_cumprod in enumerate(base_alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_map_tensors = {}

    def _scale_timesteps(self, t):
        """The original timesteps of indices t (rescaled to [0, 1000) with rescale_timesteps)."""
        if t.device not in self._timestep_map_tensors:
            self._timestep_map_tensors[t.device] = th.tensor(self.timestep_map, device=t.device)
        mapped = self._timestep_map_tensors[t.device][t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped


class _WrappedModel:
    """Upstream's adapter: calls model with the original timesteps of a respaced process's indices.

    SpacedDiffusion maps timesteps in `_scale_timesteps` instead, for models and guidance
    functions alike; this class stays for code that wraps a model itself.
    """

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
