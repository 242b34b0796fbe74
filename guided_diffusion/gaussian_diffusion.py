"""Gaussian diffusion (Ho et al. 2020) with learned variances (Nichol & Dhariwal 2021),
classifier guidance (Dhariwal & Nichol 2021), PixelAsParam guided steps, and the samplers
DDPM, DDIM and DPM-Solver++ (2M and 2M SDE, `dpm_solver.py`) by name (`SAMPLERS`).

Timesteps `t` passed to these methods are indices into this process (0 = the last step);
networks and guidance functions receive `_scale_timesteps(t)`, which a respaced process
maps back to the original timesteps.
"""

import enum
import math

import numpy as np
import torch as th

from . import dpm_solver, pixel_as_param
from .errors import UsageError
from .pixel_as_param import DIRECTIONS, PLAIN, UNGUIDED, PxPConfig
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """The beta schedule `linear` (scaled to the number of steps) or `cosine` (Nichol & Dhariwal)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        if scale * 0.02 >= 1:
            raise UsageError(f"the linear schedule needs more than 20 diffusion_steps (got {num_diffusion_timesteps}): use more or --noise_schedule cosine")
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise UsageError(f"unknown noise_schedule {schedule_name!r}: use linear or cosine")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that discretise a cumulative alpha_bar(t), t in [0, 1], capped at max_beta."""
    steps = np.arange(num_diffusion_timesteps + 1) / num_diffusion_timesteps
    return np.array([min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta) for t1, t2 in zip(steps[:-1], steps[1:])])


class ModelMeanType(enum.Enum):
    """What the network predicts for the mean."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()  # the network predicts the log-variance
    FIXED_SMALL = enum.auto()  # the posterior variance
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two fixed ones


class LossType(enum.Enum):
    MSE = enum.auto()  # simple MSE (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # the same, with the VB term rescaled (hybrid loss)
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the bound times the number of steps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather arr[timesteps] (numpy, float64) as float32 shaped to broadcast against broadcast_shape."""
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim)).expand(broadcast_shape)


def _nonzero_mask(t, x):
    """1 where t != 0, 0 at the last step (which adds no noise), shaped to broadcast with x."""
    return (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))


def _step_output(sample, out):
    """A sampling step's result: the sample, the x0 prediction and any guidance statistics."""
    result = {"sample": sample, "pred_xstart": out["pred_xstart"]}
    if "pxp" in out:
        result["pxp"] = out["pxp"]
    return result


def _checked_config(pxp):
    """pxp if it is a PxPConfig; a one-line error otherwise."""
    if not isinstance(pxp, PxPConfig):
        raise UsageError(f"pxp= takes a pixel_as_param.PxPConfig (got {type(pxp).__name__}): e.g. PxPConfig(mode='cls_den')")
    return pxp


def _given(**kwargs):
    """The keyword arguments that are not None: a loop forwards only what its caller set, so steps
    with upstream's signature (e.g. in subclasses) still accept upstream-style loop calls."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _step_noise_source(step_noise):
    """A function i -> z for the i-th timestep index from an iterable or callable (or None)."""
    if step_noise is None or callable(step_noise):
        return step_noise
    iterator = iter(step_noise)
    return lambda i: next(iterator)


class GaussianDiffusion:
    """The forward and reverse processes of a diffusion model, for training and sampling.

    :param betas: 1-D array of betas indexed by timestep (t = 0 first).
    :param pxp: a `pixel_as_param.PxPConfig`, how guided steps are taken (default: ADM-G's plain
        steps); the sampling steps and loops take a `pxp=` of their own per call.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
        pxp=None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.pxp = PxPConfig() if pxp is None else _checked_config(pxp)

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be a 1-D array in (0, 1]"
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0: clip its log to the next value
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # DPM-Solver++'s per-step coefficients, of the ODE (False) and the SDE (True)
        self.dpm_coefficients = {sde: dpm_solver.coefficients(self.alphas_cumprod, sde) for sde in (False, True)}

    # ----------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0): diffuse the data t+1 steps."""
        if noise is None:
            noise = th.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the network to get p(x_{t-1} | x_t) and the prediction of x_0.

        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict with `mean`, `variance`, `log_variance`, `pred_xstart`.
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # the network outputs v in [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            # FIXED_LARGE uses beta_t, with the posterior variance at t = 0 for a better decoder NLL
            model_variance, model_log_variance = {
                ModelVarType.FIXED_LARGE: (
                    np.append(self.posterior_variance[1], self.betas[1:]),
                    np.log(np.append(self.posterior_variance[1], self.betas[1:])),
                ),
                ModelVarType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
            }[self.model_var_type]
            model_variance = _extract_into_tensor(model_variance, t, x.shape)
            model_log_variance = _extract_into_tensor(model_log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance, "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        """The timesteps the network sees: t, or t rescaled to [0, 1000) with `rescale_timesteps`."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ----------------------------------------------------------------- guidance (ADM-G)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """The guided mean mu + Sigma * grad log p(y | x_t) (Sohl-Dickstein et al. 2015); named gradients are summed."""
        gradient = pixel_as_param.total_guidance(cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {})))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_var with eps shifted by -sqrt(1 - alpha_bar) * grad (score conditioning, for DDIM)."""
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * pixel_as_param.total_guidance(cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {})))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def _config(self, pxp):
        """The PixelAsParam settings of a call: its own `pxp=`, else the diffusion's."""
        return self.pxp if pxp is None else _checked_config(pxp)

    def _step_kind(self, config, t, cond_fn, cfg):
        """How a step is guided (UNGUIDED, PLAIN or DIRECTIONS): PxPConfig.step_kind's one rule for every
        sampler, after refusing what the guidance given cannot do."""
        if cond_fn is None and cfg is None:
            return UNGUIDED
        if cfg is not None:
            config.require(("den", "cls"), "classifier-free guidance (it combines x0 predictions, before the noise)")
            if cond_fn is not None and config.optimizer != "sgd":
                raise UsageError(f"pxp_optimizer {config.optimizer} smooths one guidance at a time: use classifier-free or classifier guidance, or pxp_optimizer sgd")
        return config.step_kind(t, self.num_timesteps)

    def _prediction(self, model, x, t, clip_denoised, denoised_fn, model_kwargs, cfg=None, kind=PLAIN, config=None, guidance_state=None):
        """p_mean_variance of the model or, when cfg is given, of the classifier-free combination.

        For classifier-free guidance `model` is the unconditional network (called without y) and
        the variance is its own; the x0 predictions combine as in `pixel_as_param`. At an UNGUIDED
        step (outside the guidance window) the conditional network alone predicts, in one call.
        """
        if cfg is None:
            return self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        model_kwargs = model_kwargs or {}
        if kind == UNGUIDED:
            return self.p_mean_variance(cfg.cond_model, x, t, clip_denoised, denoised_fn, model_kwargs)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, {k: v for k, v in model_kwargs.items() if k != "y"})
        x0_c = self.p_mean_variance(cfg.cond_model, x, t, clip_denoised, denoised_fn, model_kwargs)["pred_xstart"]
        eps_c = self._predict_eps_from_xstart(x, t, x0_c)
        eps_u = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        if kind == DIRECTIONS:
            recipm1 = _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape)
            directions = pixel_as_param.classifier_free_directions(x0_c, eps_c, eps_u, cfg.scale, recipm1)
            x0, out["pxp"] = pixel_as_param.combine(directions, config, guidance_state)
        else:
            x0 = self._predict_xstart_from_eps(x, t, (1 + cfg.scale) * eps_c - cfg.scale * eps_u)
        out["pred_xstart"] = x0.clamp(-1, 1) if clip_denoised else x0
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ----------------------------------------------------------------- DDPM sampling

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        noise=None,
        cfg=None,
        guidance_state=None,
        pxp=None,
    ):
        """Sample x_{t-1} from x_t, guided by cond_fn (classifier) or cfg (classifier-free).

        :param cond_fn: (x, t, **model_kwargs) -> the gradient, or {name: gradient} for several objectives.
        :param noise: the step's standard normal z (drawn when None).
        :param guidance_state: the `pixel_as_param.GuidanceOptimizer` carried across a loop's steps.
        :param pxp: a `pixel_as_param.PxPConfig` for this call in place of the diffusion's own.
        :return: dict with `sample`, `pred_xstart` and, for PixelAsParam steps, `pxp` statistics.
        """
        config = self._config(pxp)
        kind = self._step_kind(config, t, cond_fn, cfg)
        out = self._prediction(model, x, t, clip_denoised, denoised_fn, model_kwargs, cfg, kind, config, guidance_state)
        if noise is None:
            noise = th.randn_like(x)
        mask = _nonzero_mask(t, x)
        if cond_fn is not None and kind == DIRECTIONS:
            directions = pixel_as_param.ddpm_directions(
                out["mean"], out["pred_xstart"], _extract_into_tensor(self.posterior_mean_coef1, t, x.shape), out["variance"],
                out["log_variance"], cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {})), noise, mask,
            )
            sample, stats = pixel_as_param.combine(directions, config, guidance_state)
            return {"sample": sample, "pred_xstart": out["pred_xstart"], "pxp": stats}
        if cond_fn is not None and kind == PLAIN:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + mask * th.exp(0.5 * out["log_variance"]) * noise
        return _step_output(sample, out)

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        step_noise=None,
        cfg=None,
        pxp=None,
    ):
        """Generate samples of the given shape; `noise` is x_T, `step_noise` gives each step's z.

        :param cfg: a `pixel_as_param.ClassifierFree` for classifier-free guidance.
        :param pxp: a `pixel_as_param.PxPConfig` for this call in place of the diffusion's own.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            **_given(step_noise=step_noise, cfg=cfg, pxp=pxp),
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        step_noise=None,
        cfg=None,
        pxp=None,
    ):
        """Yield each step's p_sample output, from t = T-1 down to 0.

        :param step_noise: an iterable of z tensors in sampling order, or a callable i -> z
            for timestep index i; None draws them from torch's generator.
        """
        step_kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs)
        return self._loop(self.p_sample, model, shape, noise, device, progress, step_noise, pxp, dict(step_kwargs, **_given(cfg=cfg)))

    def _loop(self, step, model, shape, noise, device, progress, step_noise, pxp, step_kwargs):
        """Run `step` from t = T-1 to 0, yielding each output; shared by DDPM and DDIM loops."""
        if device is None:
            device = next(model.parameters()).device
        assert isinstance(shape, (tuple, list))
        img = noise if noise is not None else th.randn(*shape, device=device)
        next_noise = _step_noise_source(step_noise)
        optimizer = self._config(pxp).optimizer
        state = pixel_as_param.GuidanceOptimizer(optimizer) if optimizer != "sgd" else None
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            z = next_noise(i) if next_noise is not None else None
            with th.no_grad():
                out = step(model, img, t, **step_kwargs, **_given(noise=z, guidance_state=state, pxp=pxp))
            yield out
            img = out["sample"]

    # ----------------------------------------------------------------- DDIM sampling

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        noise=None,
        cfg=None,
        guidance_state=None,
        pxp=None,
    ):
        """Sample x_{t-1} from x_t with DDIM (Song et al. 2021); eta = 1 matches DDPM's variance. Arguments as in p_sample."""
        config = self._config(pxp)
        kind = self._step_kind(config, t, cond_fn, cfg)
        out = self._prediction(model, x, t, clip_denoised, denoised_fn, model_kwargs, cfg, kind, config, guidance_state)
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        if noise is None:
            noise = th.randn_like(x)
        mask = _nonzero_mask(t, x)
        if cond_fn is not None and kind == DIRECTIONS:
            x0 = out["pred_xstart"].float()
            directions = pixel_as_param.ddim_directions(
                x0, self._predict_eps_from_xstart(x, t, x0), alpha_bar, alpha_bar_prev,
                _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape), sigma,
                cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {})), noise, mask,
            )
            sample, stats = pixel_as_param.combine(directions, config, guidance_state)
            return {"sample": sample, "pred_xstart": out["pred_xstart"], "pxp": stats}
        if cond_fn is not None and kind == PLAIN:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        return _step_output(mean_pred + mask * sigma * noise, out)

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Deterministically map x_t to x_{t+1} with the reverse ODE of DDIM (eta must be 0)."""
        assert eta == 0.0, "the reverse ODE is only defined for deterministic paths"
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        step_noise=None,
        cfg=None,
        pxp=None,
    ):
        """Generate samples with DDIM; arguments as in p_sample_loop."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            **_given(step_noise=step_noise, cfg=cfg, pxp=pxp),
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        step_noise=None,
        cfg=None,
        pxp=None,
    ):
        """Yield each DDIM step's output, from t = T-1 down to 0; arguments as in p_sample_loop_progressive."""
        step_kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)
        return self._loop(self.ddim_sample, model, shape, noise, device, progress, step_noise, pxp, dict(step_kwargs, **_given(cfg=cfg)))

    # ----------------------------------------------------------------- DPM-Solver++ sampling

    def dpmpp_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        previous_x0=None,
        sde=False,
        x0_threshold=dpm_solver.DEFAULT_THRESHOLD,
        noise=None,
        cfg=None,
        guidance_state=None,
        pxp=None,
    ):
        """One DPM-Solver++ step from index t to t-1 (`dpm_solver`; sde: 2M SDE's), one network evaluation.

        Second order when previous_x0, the previous step's data prediction (its `pred_xstart`), is
        given, else first order. A guided step's data prediction is x0 + (1 - a) / sqrt(a) * grad,
        as condition_score makes it, bounded by x0_threshold ("none", "clip", "dynamic"); with cfg the
        classifier-free x0, bounded likewise. Other arguments as in p_sample (noise: the SDE's z).
        :return: dict with `sample`, `pred_xstart` (the data prediction the step used, guided) and,
            for PixelAsParam steps, `pxp` statistics.
        """
        config, bound = self._config(pxp), dpm_solver.thresholder(x0_threshold)
        kind = self._step_kind(config, t, cond_fn, cfg)
        out = self._prediction(model, x, t, clip_denoised, denoised_fn, model_kwargs, cfg, kind, config, guidance_state)
        coefs = self.dpm_coefficients[sde]
        x_coef, data_coef, noise_coef = (_extract_into_tensor(c, t, x.shape) for c in (coefs.x, coefs.data, coefs.noise))
        history = 0.0 if previous_x0 is None else _extract_into_tensor(coefs.history, t, x.shape)
        if sde and noise is None:
            noise = th.randn_like(x)
        z = noise if sde else None
        x0 = out["pred_xstart"].float()
        if cond_fn is None or kind == UNGUIDED:
            guided = bound(x0) if cfg is not None and kind != UNGUIDED else x0
        else:
            scale = _extract_into_tensor((1 - self.alphas_cumprod) / self.sqrt_alphas_cumprod, t, x.shape)
            pulls = pixel_as_param.data_pulls(x0, cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {})), scale, bound)
            guided = x0 + pixel_as_param.total_guidance(pulls)
            if kind == DIRECTIONS:
                directions = pixel_as_param.dpmpp_directions(x, x0, pulls, previous_x0, x_coef, data_coef, history, noise_coef, z)
                sample, stats = pixel_as_param.combine(directions, config, guidance_state)
                return {"sample": sample, "pred_xstart": guided, "pxp": stats}
        sample = dpm_solver.update(x, dpm_solver.data_term(guided, previous_x0, history), x_coef, data_coef, noise_coef, z)
        return _step_output(sample, dict(out, pred_xstart=guided))

    def dpmpp_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        sde=False,
        x0_threshold=dpm_solver.DEFAULT_THRESHOLD,
        step_noise=None,
        cfg=None,
        pxp=None,
    ):
        """Generate samples with DPM-Solver++ 2M (sde: 2M SDE), one network evaluation a step; arguments as in p_sample_loop."""
        final = None
        for final in self.dpmpp_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            sde=sde,
            x0_threshold=x0_threshold,
            **_given(step_noise=step_noise, cfg=cfg, pxp=pxp),
        ):
            pass
        return final["sample"]

    def dpmpp_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        sde=False,
        x0_threshold=dpm_solver.DEFAULT_THRESHOLD,
        step_noise=None,
        cfg=None,
        pxp=None,
    ):
        """Yield each DPM-Solver++ step's output, from t = T-1 down to 0, each step given the previous one's
        data prediction (first order at the first and the last step); arguments as in p_sample_loop_progressive."""
        previous = {}

        def step(model, x, t, **kwargs):
            out = self.dpmpp_sample(model, x, t, previous_x0=previous.get("x0"), **kwargs)
            previous["x0"] = out["pred_xstart"]
            return out

        step_kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs)
        step_kwargs.update(sde=sde, x0_threshold=x0_threshold, **_given(cfg=cfg))
        return self._loop(step, model, shape, noise, device, progress, step_noise, pxp, step_kwargs)

    def sample_loop_progressive(self, sampler, model, shape, eta=0.0, x0_threshold=dpm_solver.DEFAULT_THRESHOLD, **kwargs):
        """The progressive loop of a sampler named in SAMPLERS, with its own option (eta: ddim's,
        x0_threshold: the DPM-Solver++ ones'); kwargs as in p_sample_loop_progressive."""
        if sampler == "ddpm":
            return self.p_sample_loop_progressive(model, shape, **kwargs)
        if sampler == "ddim":
            return self.ddim_sample_loop_progressive(model, shape, eta=eta, **kwargs)
        if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
            return self.dpmpp_sample_loop_progressive(model, shape, sde=sampler == "dpmpp_2m_sde", x0_threshold=x0_threshold, **kwargs)
        raise UsageError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")

    # ----------------------------------------------------------------- training and likelihood

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dimension (the decoder NLL at t = 0)."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at timesteps t: dict with `loss` and its parts (`mse`, `vb`)."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[1]
            assert model_output.shape == (x_t.shape[0], C * 2, *x_t.shape[2:])
            model_output, model_var_values = th.split(model_output, C, dim=1)
            # learn the variance with the bound alone: the mean is frozen for this term
            frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, r=frozen_out: r, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)  # the MSE term is not divided by T

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: a constant of the bound."""
        t = th.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=th.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dimension, with per-step terms and MSEs."""
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps)[::-1]:
            t = th.tensor([i] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb, xstart_mse, mse = (th.stack(v, dim=1) for v in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}
