"""One PixelAsParam rule for every sampler: the combiners, the bound, several objectives, the windows and the flags.

The steps here run on toy deterministic "networks" (a seeded channel mix of x and t), which
exercise every code path of the diffusion in milliseconds; the reference goldens are in
test_pixel_as_param.py and test_adm_sampling.py.
"""

import math

import pytest
import torch

from guided_diffusion import pixel_as_param as pxp
from guided_diffusion.errors import UsageError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_diffusion,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    pxp_defaults,
    sr_model_and_diffusion_defaults,
)

MODES = list(pxp.MODES)
STEPS = 10  # respaced steps of the toy diffusions


# ----------------------------------------------------------------- the combiners


def _named(seed, n=6, objectives=("cls",), div=True, zero_div=False):
    """(base, ordered named directions) with strong conflicts between guidance and den and among objectives."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 3, 8, 8)
    den, apart = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    guidance = []
    for k, name in enumerate(objectives):
        g = torch.randn(shape, generator=gen) - den + (-1) ** k * 2 * apart  # conflicts with den, and with the next objective
        guidance.append((name, g * 10.0 ** -(k + 1)))  # small guidance: den's correction coefficient is large
    named = [("den", den), *guidance]
    if div:
        named.append(("div", torch.zeros(shape) if zero_div else torch.randn(shape, generator=gen) - 0.5 * guidance[0][1] * 10))
    return torch.randn(shape, generator=gen) + den, named


CASES = [
    pytest.param(dict(), id="one"),
    pytest.param(dict(objectives=("cls", "known")), id="two"),
    pytest.param(dict(objectives=("a", "b", "c")), id="three"),
    pytest.param(dict(div=False), id="no_div"),
    pytest.param(dict(zero_div=True), id="zero_div"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dweight, cweight, bound", [(1.0, 1.0, math.inf), (0.5, 0.8, math.inf), (0.0, 1.0, math.inf), (1.0, 1.0, 1.0), (0.7, 0.3, 0.05), (1.0, 1.0, 0.0)])
def test_fused_combiner_equals_the_general_one(case, mode, dweight, cweight, bound):
    base, named = _named(0, **case)
    config = pxp.PxPConfig(mode=mode, dweight=dweight, cweight=cweight, bound=bound)
    if "div" not in dict(named) and mode in ("cls_den_div", "cls_den_div2"):
        with pytest.raises(UsageError, match="projects against div"):
            config.require([n for n, _ in named], "this path")
        return
    fused, fused_stats = pxp.combine_fused(base, named, config)
    general, general_stats = pxp.combine_general(base, named, config)
    torch.testing.assert_close(fused, general, atol=2e-5, rtol=1e-5)
    assert fused_stats.keys() == general_stats.keys()
    for key in fused_stats:
        if key.startswith("fired_"):
            assert torch.equal(fused_stats[key], general_stats[key]), key
        else:
            torch.testing.assert_close(fused_stats[key], general_stats[key], atol=1e-6, rtol=1e-6)
    if mode != "none":
        assert fused_stats[f"fired_{named[1][0]}_den"].any()  # the cases do exercise the projections


def test_the_rule_written_out_for_one_objective():
    """The paper's rule, one projection at a time, for each mode (the docstring's equations)."""
    base, named = _named(1)
    d = dict(named)
    for mode in MODES:
        cls1, den1 = pxp.project(d["cls"], d["den"]), pxp.project(d["den"], d["cls"])
        cls2, div1 = pxp.project(cls1, d["div"]), pxp.project(d["div"], cls1 if mode == "cls_den_div" else d["cls"])
        expected = {
            "none": base + d["cls"] + d["div"],
            "cls_den": base - d["den"] + den1 + cls1 + d["div"],
            "cls_den_div": base - d["den"] + den1 + cls2 + div1,
            "cls_den_div2": base - d["den"] + den1 + cls2 + div1,
        }[mode]
        torch.testing.assert_close(pxp.combine_general(base, named, pxp.PxPConfig(mode=mode))[0], expected, atol=1e-5, rtol=1e-5)


def test_several_objectives_resolve_their_conflicts_first_then_meet_den():
    base, named = _named(2, objectives=("cls", "known"), div=False)
    d = dict(named)
    assert ((d["cls"] * d["known"]).flatten(1).sum(1) < 0).any()
    cls, known = pxp.project(d["cls"], d["known"]), pxp.project(d["known"], d["cls"])  # PCGrad: each against the other as given
    cls1, den1 = pxp.project(cls, d["den"]), pxp.project(d["den"], cls)
    known1, den2 = pxp.project(known, den1), pxp.project(den1, known)
    got, stats = pxp.combine_general(base, named, pxp.PxPConfig(mode="cls_den"))
    torch.testing.assert_close(got, base - d["den"] + den2 + cls1 + known1, atol=1e-5, rtol=1e-5)
    assert set(stats) == {"cos_den_cls", "cos_den_known", "cos_cls_known", "fired_cls_known", "fired_known_cls", "fired_cls_den", "fired_known_den"}
    plain, _ = pxp.combine_fused(base, named, pxp.PxPConfig(mode="none"))  # ADM-G sums the objectives
    torch.testing.assert_close(plain, base + d["cls"] + d["known"], atol=1e-6, rtol=0)


def test_one_objective_in_a_dict_is_the_plain_direction():
    base, named = _named(3)
    d = dict(named)
    as_tensor = pxp.Directions(base, d["den"], d["cls"], d["div"])
    as_dict = pxp.Directions(base, d["den"], {"cls": d["cls"]}, d["div"])
    config = pxp.PxPConfig(mode="cls_den_div2")
    a, b = pxp.combine(as_tensor, config), pxp.combine(as_dict, config)
    assert torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys()
    with pytest.raises(UsageError, match="named 'den'"):
        pxp.Directions(base, d["den"], {"den": d["cls"]}, d["div"]).named()


def test_bound_caps_the_corrections_of_den_and_div():
    base, named = _named(4, div=False)
    d = dict(named)
    unbounded = pxp.combine_general(base, named, pxp.PxPConfig(mode="cls_den", cweight=0.0))[0] - base - d["cls"]  # den1 - den
    bounded = pxp.combine_general(base, named, pxp.PxPConfig(mode="cls_den", cweight=0.0, bound=1.0))[0] - base - d["cls"]
    norm = lambda v: v.flatten(1).norm(dim=1)  # noqa: E731
    assert (norm(unbounded) > 2 * norm(d["cls"])).any()  # the paper's correction outgrows the guidance at small |cls|
    assert (norm(bounded) <= norm(d["cls"]) * (1 + 1e-5)).all()  # with KAPPA = 1 it never does
    # where the bound does not bind, nothing changes
    small = norm(unbounded) <= norm(d["cls"])
    torch.testing.assert_close(bounded[small], unbounded[small])
    # KAPPA = inf is the paper's rule, bit for bit
    config = pxp.PxPConfig(mode="cls_den_div", dweight=0.5)
    base, named = _named(5)
    assert torch.equal(pxp.combine_fused(base, named, config)[0], pxp.combine_fused(base, named, pxp.PxPConfig(mode="cls_den_div", dweight=0.5, bound=math.inf))[0])
    with pytest.raises(UsageError, match="pxp_bound -1"):
        pxp.PxPConfig(bound=-1.0)


def test_guidance_optimizer_keeps_a_state_per_objective():
    gen = torch.Generator().manual_seed(6)
    a, b = (torch.randn(3, 3, 4, 4, generator=gen) for _ in range(2))
    shared, alone = pxp.GuidanceOptimizer("adam"), pxp.GuidanceOptimizer("adam")
    shared.step(a, "cls")
    torch.testing.assert_close(shared.step(b, "known"), alone.step(b, "known"))  # "known" starts fresh


# ----------------------------------------------------------------- steps and loops on toy networks


def _toy(seed, learn_sigma=True):
    """A deterministic stand-in for a UNet: a seeded channel mix of x, t and the label."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(6 if learn_sigma else 3, 3, generator=gen) * 0.5

    def model(x, t, y=None):
        out = torch.einsum("oc,nchw->nohw", weight, x) + 0.1 * torch.cos(t.float() / 100).view(-1, 1, 1, 1)
        if y is not None:
            out = out + 0.05 * y.float().view(-1, 1, 1, 1)
        return out.tanh()

    return model


def _pull(strength=1.0):
    """A guidance function that pulls x towards a fixed pattern: it conflicts with denoising at many steps."""
    target = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8)

    def cond_fn(x, t, y=None):
        return strength * (target - x)

    return cond_fn


def _diffusion(**flags):
    return create_gaussian_diffusion(steps=100, learn_sigma=True, noise_schedule="cosine", timestep_respacing=str(STEPS), **flags)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    return x, {"y": torch.tensor([1, 4, 7])}, torch.randn(STEPS, *x.shape, generator=gen)


def _step(diffusion, inputs, t, ddim=False, **kwargs):
    x, model_kwargs, noises = inputs
    method = diffusion.ddim_sample if ddim else diffusion.p_sample
    kwargs = {"model_kwargs": model_kwargs, **(dict(eta=1.0) if ddim else {}), **kwargs}
    with torch.no_grad():
        return method(kwargs.pop("model", _toy(0)), x, torch.full((3,), t), noise=noises[t], **kwargs)


@pytest.mark.parametrize("ddim", [False, True])
@pytest.mark.parametrize("t", [9, 4, 0])
def test_zero_weights_give_the_plain_adm_g_step(inputs, ddim, t):
    plain = _step(_diffusion(), inputs, t, ddim, cond_fn=_pull())
    for mode in MODES[1:]:
        unprojected = _step(_diffusion(pxp_mode=mode, dweight=0.0, cweight=0.0), inputs, t, ddim, cond_fn=_pull())
        assert "pxp" in unprojected and "pxp" not in plain
        torch.testing.assert_close(unprojected["sample"], plain["sample"], atol=2e-6 if not ddim else 2e-5, rtol=1e-6)


@pytest.mark.parametrize("ddim", [False, True])
def test_none_mode_is_the_plain_path_bit_for_bit(inputs, ddim):
    x, model_kwargs, noises = inputs
    diffusion, t = _diffusion(pxp_mode="none", pxp_bound=1.0, dweight=0.3), torch.full((3,), 5)
    model, cond_fn = _toy(0), _pull()
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x, t, model_kwargs=model_kwargs)
        if ddim:
            out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
            eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
            expected = out["pred_xstart"] * math.sqrt(diffusion.alphas_cumprod_prev[5]) + math.sqrt(1 - diffusion.alphas_cumprod_prev[5]) * eps
        else:
            expected = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs) + torch.exp(0.5 * out["log_variance"]) * noises[5]
    got = _step(diffusion, inputs, 5, ddim, cond_fn=cond_fn, **(dict(eta=0.0) if ddim else {}))
    assert "pxp" not in got
    torch.testing.assert_close(got["sample"], expected, atol=1e-6, rtol=0)
    if not ddim:
        assert torch.equal(got["sample"], expected)


def test_several_objectives_in_a_step(inputs):
    both = pxp.named_guidance(cls=_pull(1.0), known=_pull(-0.5))
    summed = lambda x, t, y=None: _pull(1.0)(x, t) + _pull(-0.5)(x, t)  # noqa: E731
    assert torch.equal(_step(_diffusion(), inputs, 6, cond_fn=both)["sample"], _step(_diffusion(), inputs, 6, cond_fn=summed)["sample"])
    out = _step(_diffusion(pxp_mode="cls_den_div"), inputs, 6, cond_fn=both)
    assert out["pxp"]["fired_known_cls"].all()  # the two pulls are opposed
    assert {"fired_cls_den", "fired_known_den", "fired_cls_div", "fired_known_div"} <= set(out["pxp"])
    ddim = _step(_diffusion(pxp_mode="cls_den"), inputs, 6, ddim=True, cond_fn=both)
    assert torch.isfinite(ddim["sample"]).all() and "fired_cls_known" in ddim["pxp"]



def test_several_objectives_one_sample_at_a_time(inputs):
    """The driver's batch-invariant wrapper keeps a guidance function's named gradients apart."""
    from guided_diffusion.sampling_networks import per_sample

    both = pxp.named_guidance(cls=_pull(1.0), known=_pull(-0.5))
    diffusion = _diffusion(pxp_mode="cls_den")
    batched = _step(diffusion, inputs, 6, cond_fn=both)
    one_by_one = _step(diffusion, inputs, 6, cond_fn=per_sample(both))
    torch.testing.assert_close(one_by_one["sample"], batched["sample"], atol=1e-6, rtol=0)
    assert set(one_by_one["pxp"]) == set(batched["pxp"])

@pytest.mark.parametrize("ddim", [False, True])
def test_guidance_window_guides_only_its_steps(inputs, ddim):
    windowed = _diffusion(pxp_mode="cls_den", guidance_window="0.5,1")
    full, unguided = _diffusion(pxp_mode="cls_den"), _diffusion()
    for t, inside in [(9, True), (5, True), (4, False), (0, False)]:
        got = _step(windowed, inputs, t, ddim, cond_fn=_pull())
        expected = _step(full, inputs, t, ddim, cond_fn=_pull()) if inside else _step(unguided, inputs, t, ddim)
        assert ("pxp" in got) == inside
        assert torch.equal(got["sample"], expected["sample"])


@pytest.mark.parametrize("t, inside", [(9, True), (5, True), (4, False)])
def test_classifier_free_guidance_honours_the_windows(inputs, t, inside):
    cfg = pxp.ClassifierFree(cond_model=_toy(1), scale=3.0)
    uncond = _toy(0)
    projected_window = _step(_diffusion(pxp_mode="cls_den", pxp_window="0.5,1"), inputs, t, model=uncond, cfg=cfg)
    expected = _step(_diffusion(pxp_mode="cls_den" if inside else "none"), inputs, t, model=uncond, cfg=cfg)
    assert ("pxp" in projected_window) == inside
    assert torch.equal(projected_window["sample"], expected["sample"])
    # outside the guidance window the conditional network steps alone, with its own variance
    guided_window = _step(_diffusion(guidance_window="0.5,1"), inputs, t, model=uncond, cfg=cfg)
    alone = _step(_diffusion(), inputs, t, model=cfg.cond_model)
    plain = _step(_diffusion(), inputs, t, model=uncond, cfg=cfg)
    assert torch.equal(guided_window["sample"], (plain if inside else alone)["sample"])


def test_classifier_free_guidance_honours_the_optimizer(inputs):
    x, model_kwargs, noises = inputs
    cfg, uncond = pxp.ClassifierFree(cond_model=_toy(1), scale=3.0), _toy(0)

    def loop(**flags):
        return list(_diffusion(**flags).p_sample_loop_progressive(uncond, x.shape, noise=x, model_kwargs=model_kwargs, cfg=cfg, step_noise=noises.flip(0), device="cpu"))

    plain, smoothed = loop(), loop(pxp_optimizer="momentum")
    assert "pxp" not in plain[-1] and "pxp" in smoothed[-1]
    torch.testing.assert_close(plain[0]["sample"], smoothed[0]["sample"], atol=2e-4, rtol=0)  # momentum's first step is the step itself
    assert not torch.allclose(plain[-1]["sample"], smoothed[-1]["sample"])  # later ones remember earlier steps
    assert not torch.allclose(loop(pxp_mode="cls_den", pxp_optimizer="adam")[-1]["sample"], loop(pxp_mode="cls_den")[-1]["sample"])


@pytest.mark.parametrize("mode", ["cls_den_div", "cls_den_div2"])
def test_classifier_free_guidance_refuses_the_div_modes(inputs, mode):
    cfg = pxp.ClassifierFree(cond_model=_toy(1), scale=3.0)
    with pytest.raises(UsageError, match=f"pxp_mode {mode} projects against div, which classifier-free guidance .* use none or cls_den"):
        _step(_diffusion(pxp_mode=mode), inputs, 5, model=_toy(0), cfg=cfg)
    with pytest.raises(UsageError, match="projects against div"):
        _step(_diffusion(), inputs, 5, ddim=True, model=_toy(0), cfg=cfg, pxp=pxp.PxPConfig(mode=mode))


def test_a_call_can_override_the_diffusions_settings(inputs):
    x, model_kwargs, noises = inputs
    config = pxp.PxPConfig(mode="cls_den_div2", bound=1.0, window=(0.3, 1.0))
    built = _diffusion(pxp_mode="cls_den_div2", pxp_bound=1.0, pxp_window="0.3,1")
    assert built.pxp == config
    for loop in ("p_sample_loop", "ddim_sample_loop"):
        kwargs = dict(noise=x, cond_fn=_pull(), model_kwargs=model_kwargs, step_noise=noises, device="cpu")
        expected = getattr(built, loop)(_toy(0), x.shape, **kwargs)
        assert torch.equal(getattr(_diffusion(), loop)(_toy(0), x.shape, pxp=config, **kwargs), expected)
    with pytest.raises(UsageError, match="pxp= takes a pixel_as_param.PxPConfig"):
        _step(_diffusion(), inputs, 3, cond_fn=_pull(), pxp="cls_den")


def test_loops_forward_by_keyword_and_only_what_was_set(inputs):
    """A subclass whose step has upstream's signature keeps working in upstream-style loop calls."""
    x, model_kwargs, _ = inputs
    calls = []

    class Upstream(GaussianDiffusion):
        def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
            calls.append(int(t[0]))
            return super().p_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs)

    reference = _diffusion()
    diffusion = Upstream(betas=reference.betas, model_mean_type=reference.model_mean_type, model_var_type=reference.model_var_type, loss_type=reference.loss_type)
    sample = diffusion.p_sample_loop(_toy(0), x.shape, noise=x, cond_fn=_pull(), model_kwargs=model_kwargs, device="cpu")
    assert calls == list(range(STEPS))[::-1] and sample.shape == x.shape


# ----------------------------------------------------------------- the settings as one group


def test_pixel_as_param_flags_are_one_group_in_every_diffusion():
    keys = set(pxp_defaults())
    assert keys == {"pxp_mode", "dweight", "cweight", "pxp_optimizer", "pxp_window", "pxp_bound", "guidance_window"}
    for defaults in (diffusion_defaults, model_and_diffusion_defaults, classifier_and_diffusion_defaults, sr_model_and_diffusion_defaults):
        assert keys <= set(defaults())
    assert pxp.PxPConfig.from_flags(**pxp_defaults()) == pxp.PxPConfig()
    config = pxp.PxPConfig(mode="cls_den", dweight=0.5, optimizer="adam", window=(0.5, 1.0), bound=1.0, guidance_window=(0.2, 0.9))
    assert pxp.PxPConfig.from_flags(**config.flags()) == config


def test_factories_build_the_config_from_flags():
    flags = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, channel_mult="1,2", attention_resolutions="")
    flags.update(pxp_mode="auto", class_cond=True, pxp_bound=1.0, guidance_window="0.5,1")
    _, diffusion = create_model_and_diffusion(**flags)
    assert diffusion.pxp == pxp.PxPConfig(mode="cls_den", bound=1.0, guidance_window=(0.5, 1.0))
    assert create_gaussian_diffusion(pxp_mode="cls_den_div").pxp.mode == "cls_den_div"  # the upstream factory, with one more flag
    with pytest.raises(UsageError, match="unknown flag.*pxp_mdoe"):
        create_gaussian_diffusion(pxp_mdoe="cls_den")
    with pytest.raises(UsageError, match="not both"):
        create_gaussian_diffusion(pxp=pxp.PxPConfig(), pxp_mode="cls_den")
    with pytest.raises(UsageError, match="guidance_window 0.9,0.1: need 0 <= lo < hi <= 1"):
        create_gaussian_diffusion(guidance_window="0.9,0.1")


def test_a_diffusion_from_a_checkpoints_flags_keeps_every_flag():
    flags = dict(model_and_diffusion_defaults(), predict_xstart=True, rescale_timesteps=True, learn_sigma=True, noise_schedule="cosine")
    diffusion = create_diffusion(**dict({k: flags[k] for k in diffusion_defaults()}, timestep_respacing="5"))
    assert diffusion.model_mean_type.name == "START_X" and diffusion.rescale_timesteps and diffusion.num_timesteps == 5
    assert diffusion.model_var_type.name == "LEARNED_RANGE"
