"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): the multistep solvers in the data prediction, as per-step coefficients.

A sampler at step index i goes from alpha_bar_i to alpha_bar_{i-1} (1 after the last step, i = 0).
With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and
h = lambda_{i-1} - lambda_i, one step of either solver is

    x_{i-1} = A x_i + B D + N z,     D = (1 + c) x0_i - c x0_{i+1}

    dpmpp_2m (the ODE):   A = sigma_{i-1} / sigma_i,           B = alpha_{i-1} (1 - e^-h),   N = 0
    dpmpp_2m_sde:         A = sigma_{i-1} / sigma_i * e^-h,    B = alpha_{i-1} (1 - e^-2h),  N = sigma_{i-1} sqrt(1 - e^-2h)

where x0_i is the step's data prediction (guided, as `GaussianDiffusion.dpmpp_sample` makes it),
x0_{i+1} the previous step's, and c = h / (2 h_0), h_0 = lambda_i - lambda_{i+1}: the second-order
multistep ("midpoint") update. A step without a previous prediction (the first) is first order
(c = 0: DDIM's step, eta 0 for the ODE and eta 1 for the SDE), and so is the last, which ends at
sigma = 0 (h infinite: x_{-1} = x0_0), as diffusers' DPMSolverMultistepScheduler does by default
(final sigma zero). Everything is per step index, so it runs on any respacing: K respaced steps
are K network evaluations.
"""

from typing import NamedTuple

import numpy as np
import torch as th

from .errors import UsageError

THRESHOLDS = ("none", "clip", "dynamic")
DEFAULT_THRESHOLD = "clip"  # --x0_threshold's default, measured on the digits (README)
DYNAMIC_RATIO = 0.995  # the quantile of |x0| that dynamic thresholding scales to 1 (Saharia et al. 2022; diffusers' default)


class Coefficients(NamedTuple):
    """Per-step-index float64 arrays of x_{i-1} = A x_i + B [(1 + c) x0_i - c x0_{i+1}] + N z."""

    x: np.ndarray  # A
    data: np.ndarray  # B
    history: np.ndarray  # c (0 where the step is first order: the first and the last)
    noise: np.ndarray  # N


def coefficients(alphas_cumprod, sde=False):
    """The solver's coefficients for every step index of a process with these alpha_bars (see the module docstring)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    abar_prev = np.append(1.0, abar[:-1])  # where step i lands
    alpha_s, sigma_s = np.sqrt(abar), np.sqrt(1 - abar)
    alpha_t, sigma_t = np.sqrt(abar_prev), np.sqrt(1 - abar_prev)
    exp_neg_h = sigma_t * alpha_s / (alpha_t * sigma_s)  # e^-h, 0 at the last step
    if sde:
        x, data, noise = sigma_t / sigma_s * exp_neg_h, alpha_t * (1 - exp_neg_h**2), sigma_t * np.sqrt(1 - exp_neg_h**2)
    else:
        x, data, noise = sigma_t / sigma_s, alpha_t * (1 - exp_neg_h), np.zeros_like(abar)
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    history = np.zeros_like(abar)
    if len(abar) > 2:  # steps 1 .. K-2 have both a previous step and a finite h
        h, h_0 = lam[:-2] - lam[1:-1], lam[1:-1] - lam[2:]
        history[1:-1] = h / (2 * h_0)
    return Coefficients(x, data, history, noise)


def thresholder(kind):
    """The bound of a data prediction x0 by name: "none", "clip" (to [-1, 1]) or "dynamic" (per sample,
    clip to the DYNAMIC_RATIO quantile s of |x0| when s > 1 and divide by s; Saharia et al. 2022)."""
    if kind not in THRESHOLDS:
        raise UsageError(f"unknown x0_threshold {kind!r}: use one of {', '.join(THRESHOLDS)}")
    return {"none": lambda x0: x0, "clip": lambda x0: x0.clamp(-1, 1), "dynamic": _dynamic_threshold}[kind]


def _dynamic_threshold(x0):
    """Dynamic thresholding of x0 (see thresholder)."""
    s = th.quantile(x0.abs().flatten(1).float(), DYNAMIC_RATIO, dim=1).clamp(min=1).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return th.maximum(th.minimum(x0, s), -s) / s


def data_term(x0, previous_x0, history):
    """D = (1 + c) x0 - c x0_prev: the solver's data term (x0 alone when there is no previous prediction)."""
    if previous_x0 is None:
        return x0
    return x0 + history * (x0 - previous_x0)


def update(x, data, x_coef, data_coef, noise_coef=None, noise=None):
    """x_{i-1} = A x + B D (+ N z): one solver step from the data term D."""
    out = x_coef * x + data_coef * data
    return out if noise is None else out + noise_coef * noise
