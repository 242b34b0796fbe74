"""DPM-Solver++ 2M and 2M SDE: the solver's steps, guidance and PixelAsParam on them, the flags, and diffusers as a peer.

The steps run the small digits models of models/ (8x8, learned sigma) on a few samples.
"""

import argparse
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from guided_diffusion import dpm_solver
from guided_diffusion import pixel_as_param as pxp
from guided_diffusion.checkpoints import load_with_sidecar
from guided_diffusion.errors import UsageError
from guided_diffusion.gaussian_diffusion import SAMPLERS
from guided_diffusion.sampling_flags import resolve_sampler
from guided_diffusion.sampling_networks import classifier_guidance, label_aware
from guided_diffusion.script_util import create_diffusion, diffusion_defaults
import warm_python

MODES = list(pxp.MODES)
STEPS = 10


@pytest.fixture(scope="module")
def digits():
    """(the conditional digits model as the loops call it, its flags, the noisy classifier)."""
    model, flags = load_with_sidecar(ROOT / "models" / "digits_cond.pt")
    classifier, _ = load_with_sidecar(ROOT / "models" / "digits_classifier.pt")
    return label_aware(model, True), flags, classifier


def _diffusion(flags, steps=STEPS, **overrides):
    """The digits model's own diffusion, respaced to `steps`, with flag overrides (e.g. pxp_mode)."""
    return create_diffusion(**dict({k: flags[k] for k in diffusion_defaults()}, timestep_respacing=str(steps), **overrides))


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    return x, {"y": torch.tensor([1, 4, 7, 9])}, torch.randn(STEPS, *x.shape, generator=gen), torch.randn(x.shape, generator=gen).clamp(-1, 1)


def _relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def _dpmpp(diffusion, model, inputs, t, previous=False, **kwargs):
    """One DPM-Solver++ step at index t (with a previous data prediction from the inputs when asked)."""
    x, model_kwargs, noises, previous_x0 = inputs
    kwargs = dict(dict(model_kwargs=model_kwargs, noise=noises[t], previous_x0=previous_x0 if previous else None), **kwargs)
    with torch.no_grad():
        return diffusion.dpmpp_sample(model, x, torch.full((len(x),), t), **kwargs)


# ----------------------------------------------------------------- the solver


def test_coefficients_are_the_exponential_integrator_on_lambda(digits):
    _, flags, _ = digits
    abar = _diffusion(flags, 20).alphas_cumprod
    lam = np.log(np.sqrt(abar) / np.sqrt(1 - abar))
    for sde in (False, True):
        c = dpm_solver.coefficients(abar, sde)
        i = np.arange(1, 20)
        h = lam[i - 1] - lam[i]
        sigma_ratio = np.sqrt((1 - abar[i - 1]) / (1 - abar[i]))
        np.testing.assert_allclose(c.x[i], sigma_ratio * (np.exp(-h) if sde else 1), rtol=1e-10)
        np.testing.assert_allclose(c.data[i], np.sqrt(abar[i - 1]) * -np.expm1(-(2 if sde else 1) * h), rtol=1e-10)
        np.testing.assert_allclose(c.noise[i], np.sqrt(1 - abar[i - 1]) * np.sqrt(-np.expm1(-2 * h)) if sde else 0, rtol=1e-10)
        np.testing.assert_allclose(c.history[1:-1], h[:-1] / (2 * (lam[1:-1] - lam[2:])), rtol=1e-10)
        assert c.history[0] == c.history[-1] == 0  # first order at the first and the last step
        assert (c.x[0], c.data[0], c.noise[0]) == (0, 1, 0)  # the last step lands on the data prediction


@pytest.mark.parametrize("sde, eta", [(False, 0.0), (True, 1.0)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [9, 4, 0])
def test_a_first_order_step_is_ddims_step_directions_included(digits, inputs, sde, eta, mode, t):
    """Without a previous prediction the 2M step is DDIM's (eta 0), the 2M SDE step DDIM's with eta 1,
    guided by ADM's condition_score and projected alike: the derivation in pixel_as_param's docstring."""
    model, flags, classifier = digits
    x, model_kwargs, noises, _ = inputs
    diffusion, cond_fn = _diffusion(flags, pxp_mode=mode), classifier_guidance(classifier, 2.0)
    ours = _dpmpp(diffusion, model, inputs, t, cond_fn=cond_fn, sde=sde, x0_threshold="none")
    with torch.no_grad():
        ddim = diffusion.ddim_sample(model, x, torch.full((len(x),), t), cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, noise=noises[t])
    assert _relative_error(ours["sample"], ddim["sample"]) < 1e-5
    assert ("pxp" in ours) == ("pxp" in ddim) == (mode != "none")


@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("threshold", ["none", "clip", "dynamic"])
@pytest.mark.parametrize("t", [6, 0])
def test_zero_weights_give_the_plain_guided_step(digits, inputs, sde, threshold, t):
    model, flags, classifier = digits
    kwargs = dict(cond_fn=classifier_guidance(classifier, 2.0), sde=sde, x0_threshold=threshold, previous=True)
    plain = _dpmpp(_diffusion(flags), model, inputs, t, **kwargs)
    for mode in MODES[1:]:
        unprojected = _dpmpp(_diffusion(flags, pxp_mode=mode, dweight=0.0, cweight=0.0), model, inputs, t, **kwargs)
        assert "pxp" in unprojected and "pxp" not in plain
        assert _relative_error(unprojected["sample"], plain["sample"]) < 1e-6
        assert torch.equal(unprojected["pred_xstart"], plain["pred_xstart"])  # the history holds the plain guided x0


@pytest.mark.parametrize("sde", [False, True])
def test_mode_none_is_the_plain_guided_step_bit_for_bit(digits, inputs, sde):
    model, flags, classifier = digits
    x, model_kwargs, noises, previous_x0 = inputs
    cond_fn, t = classifier_guidance(classifier, 2.0), 5
    plain = _dpmpp(_diffusion(flags), model, inputs, t, cond_fn=cond_fn, sde=sde, previous=True)
    for config in (pxp.PxPConfig(mode="none", bound=1.0, dweight=0.3), pxp.PxPConfig(mode="cls_den", window=(0.0, 0.5))):
        got = _dpmpp(_diffusion(flags), model, inputs, t, cond_fn=cond_fn, sde=sde, previous=True, pxp=config)
        assert "pxp" not in got
        assert torch.equal(got["sample"], plain["sample"])
    # written out: ADM's condition_score, clipped, then x_{t-1} = A x + B [(1 + c) x0' - c x0_prev] + N z
    diffusion, ts = _diffusion(flags), torch.full((len(x),), t)
    with torch.no_grad():
        out = diffusion.condition_score(cond_fn, diffusion.p_mean_variance(model, x, ts, model_kwargs=model_kwargs), x, ts, model_kwargs=model_kwargs)
    guided = out["pred_xstart"].clamp(-1, 1)
    coefs = dpm_solver.coefficients(diffusion.alphas_cumprod, sde)
    c = coefs.history[t]
    expected = coefs.x[t] * x + coefs.data[t] * ((1 + c) * guided - c * previous_x0) + coefs.noise[t] * noises[t]
    torch.testing.assert_close(plain["pred_xstart"], guided, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain["sample"], expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sde", [False, True])
def test_fused_combiner_equals_the_general_one_on_solver_directions(digits, inputs, sde):
    model, flags, classifier = digits
    x, model_kwargs, noises, previous_x0 = inputs
    diffusion, t = _diffusion(flags), torch.full((len(x),), 6)
    with torch.no_grad():
        x0 = diffusion.p_mean_variance(model, x, t, model_kwargs=model_kwargs)["pred_xstart"]
    gradient = pxp.named_guidance(cls=classifier_guidance(classifier, 5.0), known=lambda x, t, y=None: (previous_x0 - x) * 0.1)(x, t, y=model_kwargs["y"])
    coefs = [torch.tensor(a[6], dtype=torch.float32) for a in dpm_solver.coefficients(diffusion.alphas_cumprod, sde)]
    pulls = pxp.data_pulls(x0, gradient, float((1 - diffusion.alphas_cumprod[6]) / diffusion.sqrt_alphas_cumprod[6]), dpm_solver.thresholder("clip"))
    directions = pxp.dpmpp_directions(x, x0, pulls, previous_x0, coefs[0], coefs[1], coefs[2], coefs[3], noises[6] if sde else None).named()
    base = coefs[0] * x + dict(directions)["den"]
    for mode in MODES:
        config = pxp.PxPConfig(mode=mode)
        fused, general = pxp.combine_fused(base, directions, config), pxp.combine_general(base, directions, config)
        torch.testing.assert_close(fused[0], general[0], atol=2e-5, rtol=1e-5)
        if mode != "none":
            assert fused[1]["fired_cls_den"].any() or fused[1]["fired_known_den"].any()


# ----------------------------------------------------------------- the loops


def test_the_loop_passes_each_steps_data_prediction_to_the_next(digits, inputs):
    model, flags, classifier = digits
    x, model_kwargs, noises, _ = inputs
    diffusion, cond_fn = _diffusion(flags), classifier_guidance(classifier, 2.0)
    outs = list(diffusion.dpmpp_sample_loop_progressive(model, x.shape, noise=x, cond_fn=cond_fn, model_kwargs=model_kwargs, device="cpu", sde=True, step_noise=noises.__getitem__))
    assert len(outs) == STEPS
    sample, previous = x, None
    for k, t in enumerate(range(STEPS)[::-1]):
        with torch.no_grad():
            step = diffusion.dpmpp_sample(model, sample, torch.full((len(x),), t), cond_fn=cond_fn, model_kwargs=model_kwargs, previous_x0=previous, sde=True, noise=noises[t])
        assert torch.equal(step["sample"], outs[k]["sample"])
        sample, previous = step["sample"], step["pred_xstart"]
    first_order = _dpmpp(diffusion, model, (outs[0]["sample"], model_kwargs, noises, None), STEPS - 2, cond_fn=cond_fn, sde=True)
    assert not torch.allclose(first_order["sample"], outs[1]["sample"])  # the second step is second order


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_network_evaluation_a_step_on_any_respacing(digits, inputs, sampler):
    model, flags, classifier = digits
    x, model_kwargs, _, _ = inputs
    calls = {"model": 0, "classifier": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    cond_fn = counted("classifier", classifier_guidance(classifier, 1.0))
    for respacing, expected in (("7", 7), ("ddim5", 5)):
        calls.update(model=0, classifier=0)
        diffusion = create_diffusion(**dict({k: flags[k] for k in diffusion_defaults()}, timestep_respacing=respacing))
        for _ in diffusion.sample_loop_progressive(sampler, counted("model", model), x.shape, noise=x, cond_fn=cond_fn, model_kwargs=model_kwargs, device="cpu"):
            pass
        assert calls == {"model": expected, "classifier": expected}


def test_learned_and_fixed_sigma_models_sample_alike(digits, inputs):
    """The solvers use the model's mean prediction only: a fixed-sigma model with the same eps gives the same samples."""
    model, flags, _ = digits
    x, model_kwargs, noises, _ = inputs
    fixed = _diffusion(dict(flags, learn_sigma=False))
    eps_only = lambda x, t, **kwargs: model(x, t, **kwargs)[:, :3]  # noqa: E731
    for sde in (False, True):
        kwargs = dict(noise=x, model_kwargs=model_kwargs, device="cpu", sde=sde, step_noise=noises.__getitem__)
        learned = _diffusion(flags).dpmpp_sample_loop(model, x.shape, **kwargs)
        assert torch.equal(fixed.dpmpp_sample_loop(eps_only, x.shape, **kwargs), learned)
        assert torch.isfinite(learned).all() and learned.abs().max() <= 1


def test_sampler_names_and_the_ddpm_loop(digits, inputs):
    model, flags, _ = digits
    x, model_kwargs, noises, _ = inputs
    diffusion = _diffusion(flags)
    kwargs = dict(noise=x, model_kwargs=model_kwargs, device="cpu", step_noise=noises.__getitem__)
    by_name = list(diffusion.sample_loop_progressive("ddpm", model, x.shape, **kwargs))[-1]["sample"]
    assert torch.equal(by_name, diffusion.p_sample_loop(model, x.shape, **kwargs))
    with pytest.raises(UsageError, match="unknown sampler 'dpm': use one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde"):
        diffusion.sample_loop_progressive("dpm", model, x.shape, **kwargs)


# ----------------------------------------------------------------- thresholds and guidance


def test_thresholds_bound_the_guided_data_prediction(digits, inputs):
    """At the first step of the cosine schedule ADM's guided x0 gets the gradient times (1 - a) / sqrt(a) ~ 2e4."""
    model, flags, classifier = digits
    kwargs = dict(cond_fn=classifier_guidance(classifier, 1.0))
    raw = _dpmpp(_diffusion(flags), model, inputs, STEPS - 1, x0_threshold="none", **kwargs)["pred_xstart"]
    assert raw.abs().max() > 100
    clipped = _dpmpp(_diffusion(flags), model, inputs, STEPS - 1, x0_threshold="clip", **kwargs)["pred_xstart"]
    torch.testing.assert_close(clipped, raw.clamp(-1, 1), atol=1e-6, rtol=0)
    dynamic = _dpmpp(_diffusion(flags), model, inputs, STEPS - 1, x0_threshold="dynamic", **kwargs)["pred_xstart"]
    s = torch.quantile(raw.abs().flatten(1), dpm_solver.DYNAMIC_RATIO, dim=1).clamp(min=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(dynamic, torch.maximum(torch.minimum(raw, s), -s) / s)
    assert dynamic.abs().max() <= 1
    with pytest.raises(UsageError, match="unknown x0_threshold 'soft': use one of none, clip, dynamic"):
        _dpmpp(_diffusion(flags), model, inputs, 3, x0_threshold="soft")
    unguided = _dpmpp(_diffusion(flags), model, inputs, 3, x0_threshold="dynamic", clip_denoised=False)["pred_xstart"]
    with torch.no_grad():
        x, model_kwargs, _, _ = inputs
        model_x0 = _diffusion(flags).p_mean_variance(model, x, torch.full((4,), 3), clip_denoised=False, model_kwargs=model_kwargs)["pred_xstart"]
    assert torch.equal(unguided, model_x0)  # an unguided step's x0 is the model's


def test_the_rule_windows_objectives_and_optimizer_apply(digits, inputs):
    model, flags, classifier = digits
    x, model_kwargs, noises, _ = inputs
    cond_fn = classifier_guidance(classifier, 2.0)
    windowed, full, unguided = _diffusion(flags, pxp_mode="cls_den", guidance_window="0.5,1"), _diffusion(flags, pxp_mode="cls_den"), _diffusion(flags)
    for t, inside in [(9, True), (5, True), (4, False)]:
        got = _dpmpp(windowed, model, inputs, t, cond_fn=cond_fn, previous=True)
        expected = _dpmpp(full, model, inputs, t, cond_fn=cond_fn, previous=True) if inside else _dpmpp(unguided, model, inputs, t, previous=True)
        assert ("pxp" in got) == inside and torch.equal(got["sample"], expected["sample"])
    pull = lambda x, t, y=None: -0.5 * x  # noqa: E731
    both, summed = pxp.named_guidance(cls=cond_fn, known=pull), lambda x, t, y=None: cond_fn(x, t, y=y) + pull(x, t)
    one = _dpmpp(unguided, model, inputs, 6, cond_fn=summed, x0_threshold="none", previous=True)
    two = _dpmpp(unguided, model, inputs, 6, cond_fn=both, x0_threshold="none", previous=True)
    torch.testing.assert_close(two["sample"], one["sample"], atol=1e-5, rtol=1e-5)  # ADM-G sums the objectives
    assert {"fired_cls_known", "fired_known_cls", "fired_cls_den"} <= set(_dpmpp(full, model, inputs, 6, cond_fn=both, previous=True)["pxp"])
    kwargs = dict(noise=x, cond_fn=cond_fn, model_kwargs=model_kwargs, device="cpu", step_noise=noises.__getitem__)
    plain = full.dpmpp_sample_loop(model, x.shape, **kwargs)
    assert not torch.allclose(full.dpmpp_sample_loop(model, x.shape, pxp=pxp.PxPConfig(mode="cls_den", optimizer="momentum"), **kwargs), plain)


def test_classifier_free_guidance_on_the_solver(digits, inputs):
    model, flags, _ = digits
    x, model_kwargs, noises, _ = inputs
    unconditional = lambda x, t, y=None: model(x, t, y=torch.zeros_like(model_kwargs["y"]))  # noqa: E731 (a stand-in network)
    # (not at the first step, where DDIM's eta 1 coefficient sqrt(1 - a' - sigma^2) cancels to 1e-4 in float32)
    cfg, ts = pxp.ClassifierFree(cond_model=model, scale=2.0), torch.full((4,), 4)
    for mode, eta, sde in (("none", 0.0, False), ("cls_den", 1.0, True)):
        diffusion = _diffusion(flags, pxp_mode=mode)
        ours = _dpmpp(diffusion, unconditional, inputs, 4, cfg=cfg, sde=sde, x0_threshold="none")
        with torch.no_grad():
            ddim = diffusion.ddim_sample(unconditional, x, ts, cfg=cfg, model_kwargs=model_kwargs, eta=eta, noise=noises[4])
        assert _relative_error(ours["sample"], ddim["sample"]) < 1e-5
    with pytest.raises(UsageError, match="projects against div, which classifier-free guidance"):
        _dpmpp(_diffusion(flags, pxp_mode="cls_den_div2"), unconditional, inputs, 5, cfg=cfg, sde=True)


# ----------------------------------------------------------------- the flags


def _flags(**given):
    args = dict(sampler="ddpm", use_ddim=False, eta=0.0, x0_threshold=dpm_solver.DEFAULT_THRESHOLD)
    return argparse.Namespace(**dict(args, **given)), set(given)


@pytest.mark.parametrize("given, sampler", [({}, "ddpm"), ({"use_ddim": True}, "ddim"), ({"sampler": "ddim", "use_ddim": True}, "ddim"),
                                            ({"sampler": "dpmpp_2m_sde", "x0_threshold": "dynamic"}, "dpmpp_2m_sde"), ({"sampler": "ddim", "eta": 1.0}, "ddim")])
def test_the_sampler_flag(given, sampler):
    assert resolve_sampler(*_flags(**given)) == sampler


@pytest.mark.parametrize("given, message", [
    ({"sampler": "dpmpp_2m", "use_ddim": True}, "--use_ddim True and --sampler dpmpp_2m contradict each other"),
    ({"sampler": "ddpm", "use_ddim": True}, "--use_ddim True and --sampler ddpm contradict each other"),
    ({"sampler": "dpmpp_2m", "eta": 0.5}, "--eta is DDIM's noise level, not dpmpp_2m's"),
    ({"x0_threshold": "dynamic"}, "--x0_threshold bounds the guided x0 of the DPM-Solver\\+\\+ samplers, not ddpm's"),
    ({"sampler": "dpmpp_3m"}, "unknown --sampler 'dpmpp_3m': use one of"),
    ({"sampler": "dpmpp_2m", "x0_threshold": "soft"}, "unknown --x0_threshold 'soft'"),
])
def test_contradictory_sampler_flags_are_refused_in_one_line(given, message):
    with pytest.raises(UsageError, match=message):
        resolve_sampler(*_flags(**given))


@pytest.mark.slow
def test_a_sampling_script_with_the_solver(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "classifier_sample.py"), "--sampler", "dpmpp_2m_sde", "--timestep_respacing", "8",
               "--num_samples", "4", "--output", str(tmp_path)]
    proc = warm_python.run(command)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "samples_4x8x8x3.npz") as npz:
        assert npz["arr_0"].shape == (4, 8, 8, 3) and npz["arr_0"].std() > 10
    refused = warm_python.run(command + ["--use_ddim", "True"])
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "contradict" in refused.stderr


# ----------------------------------------------------------------- diffusers as a peer


def _diffusers_scheduler(base, algorithm, float64_schedule):
    """diffusers' DPMSolverMultistepScheduler with our betas, clipping x0 as clip_denoised does (thresholding at 1)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(base.betas), trained_betas=base.betas, algorithm_type=algorithm, solver_order=2, thresholding=True, sample_max_value=1.0
    )
    if float64_schedule:  # our alpha_bar products, in place of its float32 ones
        scheduler.alphas_cumprod = torch.from_numpy(base.alphas_cumprod)
    return scheduler


@pytest.mark.slow
@pytest.mark.parametrize("sampler, algorithm", [("dpmpp_2m", "dpmsolver++"), ("dpmpp_2m_sde", "sde-dpmsolver++")])
@pytest.mark.parametrize("steps", [5, 20])
def test_the_solvers_match_diffusers(digits, sampler, algorithm, steps):
    """Unguided, on the model's respaced timesteps and betas: within 1e-4 of diffusers per sample. With the same
    float64 alpha_bars in both, most samples agree within 1e-5 (the rest is the rounding of diffusers' float32
    product); a sample with pixels at the clip edge of x0 keeps a few 1e-5 of float32 rounding."""
    model, flags, _ = digits
    diffusion, base = _diffusion(flags, steps), _diffusion(flags, "")
    gen = torch.Generator().manual_seed(1)
    x_T, y = torch.randn(6, 3, 8, 8, generator=gen), torch.arange(6)
    noises = torch.randn(steps, *x_T.shape, generator=gen)
    ours = list(diffusion.sample_loop_progressive(sampler, model, x_T.shape, noise=x_T, model_kwargs={"y": y}, device="cpu", step_noise=noises.__getitem__))[-1]["sample"]
    for float64_schedule, typical in ((False, 1e-4), (True, 1e-5)):
        scheduler = _diffusers_scheduler(base, algorithm, float64_schedule)
        scheduler.set_timesteps(timesteps=sorted(diffusion.timestep_map, reverse=True))
        x = x_T.clone()
        with torch.no_grad():
            for k, t in enumerate(scheduler.timesteps):
                eps = model(x, torch.full((len(x),), int(t)), y=y)[:, :3]
                x = scheduler.step(eps, t, x, variance_noise=noises[steps - 1 - k] if sampler.endswith("sde") else None).prev_sample
        per_sample = (ours - x).abs().flatten(1).max(dim=1).values
        assert per_sample.max() < 1e-4 and per_sample.median() < typical
    assert ours.std() > 0.3  # digits, not a blank
