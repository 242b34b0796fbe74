"""PixelAsParam steps: the reference goldens, and the properties of the projections and optimizers."""

import pytest
import torch

from conftest import assert_close
from guided_diffusion import pixel_as_param as pxp
from guided_diffusion.checkpoints import DEFAULTS, parse_flags
from guided_diffusion.errors import UsageError
from guided_diffusion.sampling_networks import classifier_guidance
from guided_diffusion.script_util import create_model_and_diffusion
from helpers import SAMPLING, golden_model_and_diffusion, golden_network, guidance, loop_noises, npz, sampling_inputs, step_noise, without_labels

MODES = ["cls_den", "cls_den_div", "cls_den_div2"]


def gold(key):
    return npz("golden_sampling")[key]


@pytest.fixture(scope="module")
def classifier():
    return golden_network("classifier32")


@pytest.fixture(scope="module")
def inputs():
    return sampling_inputs()


# ----------------------------------------------------------------- reference goldens


# In the pxpc loops every step projects strongly conflicting directions (cosine about -0.8), which
# amplifies rounding about 100x by mid-loop: the reference moved by 3.1e-5 when only its thread
# count changed. Our fused combination rounds differently from the reference's sequential one (it
# is the closer of the two to a float64 evaluation, step by step) and lands up to 2.8e-4 from `mid`;
# with the reference's operation order substituted it lands within 2.9e-5.
PXPC_MID_ATOL = 1e-3


def assert_loop_matches(outputs, prefix, mid_atol=1e-4):
    """A 25-step loop's outputs against the reference's `mid` (after SAMPLING["mid_step"] steps) and final `sample`."""
    assert len(outputs) == 25
    assert_close(outputs[SAMPLING["mid_step"] - 1]["sample"], gold(prefix + "mid"), atol=mid_atol)
    assert_close(outputs[-1]["sample"], gold(prefix + "sample"))


@pytest.mark.parametrize("mode", MODES)
def test_pxp_steps(mode, inputs):
    x, kwargs = inputs
    model, diffusion = golden_model_and_diffusion("unet_u", timestep_respacing="25", pxp_mode=mode)
    cond_fn = guidance(SAMPLING["classifier_scale"])
    for t in (24, 12, 0):
        with torch.no_grad():
            out = diffusion.p_sample(without_labels(model), x, torch.full((3,), t), cond_fn=cond_fn, model_kwargs=kwargs, noise=step_noise("pxp", t))
        assert_close(out["sample"], gold(f"pxp/{mode}/r25/t{t}/sample"))
        assert set(out["pxp"]) == {"cos_den_cls", "cos_cls_div", "cos_den_div", "fired_cls_den", "fired_cls_div"}


@pytest.mark.parametrize("mode", MODES + ["none"])
def test_pxp_loops(mode, inputs):
    x, kwargs = inputs
    model, diffusion = golden_model_and_diffusion("unet_u", timestep_respacing="25", pxp_mode=mode)
    outputs = diffusion.p_sample_loop_progressive(
        without_labels(model), x.shape, noise=x, cond_fn=guidance(SAMPLING["classifier_scale"]), model_kwargs=kwargs,
        device="cpu", step_noise=loop_noises("pxp/loop25"),
    )
    assert_loop_matches(list(outputs), f"pxp/{mode}/loop25/")


@pytest.mark.parametrize("mode", MODES + ["none"])
def test_pxp_loops_with_conflicting_guidance(mode, inputs):
    """The class-conditional recipe, with a guidance pull that makes every projection fire."""
    x, kwargs = inputs
    model, diffusion = golden_model_and_diffusion("unet_a", timestep_respacing="25", pxp_mode=mode, noise_schedule="linear")
    grad = guidance(SAMPLING["pxpc_classifier_scale"])
    pull = SAMPLING["pxpc_pull"] * torch.tensor([1.0, 1.0, 0.0]).view(-1, 1, 1, 1)  # samples 0 and 1 only
    outputs = list(diffusion.p_sample_loop_progressive(
        model, x.shape, noise=x, cond_fn=lambda x, t, y=None: grad(x, t, y=y) - pull * x, model_kwargs=kwargs,
        step_noise=loop_noises("pxpc/loop25"),
    ))
    assert_loop_matches(outputs, f"pxpc/{mode}/loop25/", mid_atol=PXPC_MID_ATOL)
    if mode != "none":
        assert all(out["pxp"]["fired_cls_den"][:2].all() for out in outputs)  # the pull conflicts with denoising at every step


def _cfg_networks():
    """The fixtures' classifier-free pair: the "unconditional" network is unet_a with its eps scaled
    (samples 0 and 1, so the projection fires) and the real unet_u (sample 2); the conditional one is unet_a."""
    cond_net, uncond_net = golden_network("unet_a"), golden_network("unet_u")
    _, kwargs = sampling_inputs()
    scaled = torch.tensor([1.0, 1.0, 0.0]).view(-1, 1, 1, 1)

    def uncond(x, t):
        out = cond_net(x, t, **kwargs)
        out = torch.cat([out[:, :3] * SAMPLING["cfg_eps_mult"], out[:, 3:]], dim=1)
        return scaled * out + (1 - scaled) * uncond_net(x, t)

    return uncond, cond_net


def _classifier_free(kind, w):
    """A classifier-free fixture's diffusion, unconditional network and guidance, and whether it projects."""
    settings = SAMPLING["cfg"][f"{kind}/w{w}"]
    projects = "den_weight" in settings
    _, diffusion = golden_model_and_diffusion(
        "unet_a", timestep_respacing="25", pxp_mode="cls_den" if projects else "none",
        dweight=settings.get("den_weight", 1.0), cweight=settings.get("cond_weight", 1.0),
    )
    uncond, cond_net = _cfg_networks()
    return diffusion, uncond, pxp.ClassifierFree(cond_model=cond_net, scale=settings["w_cond"]), projects


@pytest.mark.parametrize("w", [1, 3])
@pytest.mark.parametrize("kind", ["cfg", "cfg_pxp", "cfg_pxp_w"])
def test_classifier_free_steps(kind, w, inputs):
    x, kwargs = inputs
    diffusion, uncond, cfg, projects = _classifier_free(kind, w)
    for t in (24, 12, 0):
        with torch.no_grad():
            out = diffusion.p_sample(uncond, x, torch.full((3,), t), model_kwargs=kwargs, cfg=cfg, noise=step_noise("cfg", t))
        assert_close(out["sample"], gold(f"{kind}/w{w}/r25/t{t}/sample"))
        assert ("pxp" in out) == projects


@pytest.mark.slow
@pytest.mark.parametrize("w", [1, 3])
@pytest.mark.parametrize("kind", ["cfg", "cfg_pxp", "cfg_pxp_w"])
def test_classifier_free_loops(kind, w, inputs):
    x, kwargs = inputs
    diffusion, uncond, cfg, projects = _classifier_free(kind, w)
    outputs = list(diffusion.p_sample_loop_progressive(uncond, x.shape, noise=x, model_kwargs=kwargs, cfg=cfg, device="cpu", step_noise=loop_noises("cfg/loop25")))
    assert_loop_matches(outputs, f"{kind}/w{w}/loop25/")
    if projects:
        assert any(out["pxp"]["fired_cls_den"][:2].any() for out in outputs)  # the projection was exercised


# ----------------------------------------------------------------- properties of a step


def _directions(seed, n=6, conflict=True):
    gen = torch.Generator().manual_seed(seed)
    den, cls, div = (torch.randn(n, 3, 8, 8, generator=gen) for _ in range(3))
    if conflict:
        cls = cls - 2 * den  # make <cls, den> < 0 for most samples
    return pxp.Directions(base=torch.randn(n, 3, 8, 8, generator=gen) + den, den=den, cls=cls, div=div)


def _sequential(d, mode, dw=1.0, cw=1.0):
    """The rule written out one projection at a time, as the paper states it."""
    cls1, den1 = pxp.project(d.cls, d.den, cw), pxp.project(d.den, d.cls, dw)
    if mode == "cls_den":
        return d.base - d.den + den1 + cls1 + d.div
    partner = cls1 if mode == "cls_den_div" else d.cls
    cls2, div1 = pxp.project(cls1, d.div, cw), pxp.project(d.div, partner, dw)
    return d.base - d.den + den1 + cls2 + div1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_fused_step_equals_sequential_projections(mode, weights):
    d = _directions(0)
    dw, cw = weights
    sample, stats = pxp.combine(d, pxp.PxPConfig(mode=mode, dweight=dw, cweight=cw))
    torch.testing.assert_close(sample, _sequential(d, mode, dw, cw), atol=1e-5, rtol=1e-5)
    assert stats["fired_cls_den"].float().mean() > 0.5


def test_projection_removes_the_conflict():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 3, 4, 4, generator=gen), torch.randn(64, 3, 4, 4, generator=gen)
    dots = (a * b).flatten(1).sum(1)
    projected = pxp.project(a, b)
    after = (projected * b).flatten(1).sum(1)
    assert (dots < 0).any() and (after >= -1e-4 * (b * b).flatten(1).sum(1)).all()
    assert torch.equal(projected[dots >= 0], a[dots >= 0])  # no conflict: untouched
    assert torch.equal(pxp.project(a, torch.zeros_like(b)), a)  # a zero partner projects nothing
    assert torch.allclose(pxp.project(a, b, 0.5), a + 0.5 * (projected - a))


@pytest.mark.parametrize("mode", MODES)
def test_no_conflict_means_no_projection(mode):
    d = _directions(2, conflict=False)
    d = d._replace(cls=d.den.abs() * 0 + d.den * 0.3 + 0.01 * d.div.abs(), div=d.den * 0.2)  # all pairs aligned
    sample, stats = pxp.combine(d, pxp.PxPConfig(mode=mode))
    plain, _ = pxp.combine(d, pxp.PxPConfig(mode="none"))
    assert not stats["fired_cls_den"].any() and not stats["fired_cls_div"].any()
    torch.testing.assert_close(sample, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, d.base + d.cls + d.div, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_samples_are_independent_of_the_batch(mode):
    d = _directions(3)
    batched, _ = pxp.combine(d, pxp.PxPConfig(mode=mode))
    for i in range(len(d.den)):
        single, _ = pxp.combine(pxp.Directions(*(v[i : i + 1] for v in d)), pxp.PxPConfig(mode=mode))
        torch.testing.assert_close(single[0], batched[i], atol=1e-6, rtol=1e-6)


def test_zero_weights_disable_projections():
    d = _directions(4)
    off, stats = pxp.combine(d, pxp.PxPConfig(mode="cls_den_div", dweight=0.0, cweight=0.0))
    torch.testing.assert_close(off, d.base + d.cls + d.div, atol=1e-6, rtol=0)
    assert stats["fired_cls_den"].any()  # the conflict is reported even when nothing is corrected
    one_sided, _ = pxp.combine(d, pxp.PxPConfig(mode="cls_den", dweight=0.0))
    torch.testing.assert_close(one_sided, d.base + pxp.project(d.cls, d.den) + d.div, atol=1e-5, rtol=0)


def test_plain_adm_g_path_is_bitwise_unchanged(classifier, inputs):
    x, kwargs = inputs
    model, default = golden_model_and_diffusion("unet_a", timestep_respacing="25")
    _, explicit = golden_model_and_diffusion("unet_a", timestep_respacing="25", pxp_mode="none", dweight=0.3)
    cond_fn, t, noise = classifier_guidance(classifier, 10000.0), torch.full((3,), 12), torch.randn_like(x)
    with torch.no_grad():
        mean = default.p_mean_variance(model, x, t, model_kwargs=kwargs)
        expected = default.condition_mean(cond_fn, mean, x, t, model_kwargs=kwargs) + torch.exp(0.5 * mean["log_variance"]) * noise
        actual = explicit.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs=kwargs, noise=noise)["sample"]
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("t, inside", [(20, True), (13, True), (12, False), (3, False)])
def test_window_projects_only_its_steps(classifier, inputs, t, inside):
    x, kwargs = inputs
    model, windowed = golden_model_and_diffusion("unet_a", timestep_respacing="25", pxp_mode="cls_den", pxp_window="0.5,1")
    _, full = golden_model_and_diffusion("unet_a", timestep_respacing="25", pxp_mode="cls_den")
    _, plain = golden_model_and_diffusion("unet_a", timestep_respacing="25")
    cond_fn, steps, noise = classifier_guidance(classifier, 10000.0), torch.full((3,), t), torch.randn_like(x)
    with torch.no_grad():
        got, expected = (d.p_sample(model, x, steps, cond_fn=cond_fn, model_kwargs=kwargs, noise=noise) for d in (windowed, full if inside else plain))
    assert ("pxp" in got) == inside  # 13/25 >= 0.5 projects, 12/25 does not
    assert torch.equal(got["sample"], expected["sample"])


# ----------------------------------------------------------------- DDIM


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [20, 12, 3, 0])
def test_ddim_directions_reassemble_adm_g_ddim(classifier, inputs, eta, t):
    """With both weights 0 nothing is projected, so the direction view must be ADM-G's DDIM step."""
    x, kwargs = inputs
    model, adm = golden_model_and_diffusion("unet_a", timestep_respacing="25")
    _, unprojected = golden_model_and_diffusion("unet_a", timestep_respacing="25", pxp_mode="cls_den_div", dweight=0.0, cweight=0.0)
    cond_fn, ts, noise = classifier_guidance(classifier, 10000.0), torch.full((3,), t), torch.randn_like(x)
    with torch.no_grad():
        expected = adm.ddim_sample(model, x, ts, cond_fn=cond_fn, model_kwargs=kwargs, eta=eta, noise=noise)["sample"]
        actual = unprojected.ddim_sample(model, x, ts, cond_fn=cond_fn, model_kwargs=kwargs, eta=eta, noise=noise)["sample"]
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pxp_loops_stay_finite(classifier, inputs, mode, eta):
    x, kwargs = inputs
    model, diffusion = golden_model_and_diffusion("unet_a", timestep_respacing="ddim10", pxp_mode=mode)
    grad = classifier_guidance(classifier, 10000.0)
    fired = []
    for out in diffusion.ddim_sample_loop_progressive(model, x.shape, noise=x, cond_fn=lambda x, t, y=None: grad(x, t, y=y) - x, model_kwargs=kwargs, eta=eta):
        assert torch.isfinite(out["sample"]).all()
        fired.append(out["pxp"]["fired_cls_den"].float().mean().item())
    assert max(fired) == 1.0  # the -x pull conflicts with denoising, so the projections were exercised
    if eta == 0.0:
        assert not out["pxp"]["fired_cls_div"].any()  # no diversity direction without noise


# ----------------------------------------------------------------- optimizer, flags, statistics


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_guidance_optimizer_keeps_the_norm_and_smooths_the_direction(kind):
    gen = torch.Generator().manual_seed(5)
    opt = pxp.GuidanceOptimizer(kind)
    steps = [torch.randn(4, 3, 8, 8, generator=gen) * (i + 1) for i in range(5)]
    outputs = [opt.step(g) for g in steps]
    norm = lambda v: v.flatten(1).norm(dim=1)
    for g, u in zip(steps, outputs):
        torch.testing.assert_close(norm(u), norm(g), rtol=1e-5, atol=0)
    first = steps[0] if kind == "momentum" else steps[0].sign()  # Adam's first step is sign descent
    torch.testing.assert_close(outputs[0], first * (norm(steps[0]) / norm(first)).view(-1, 1, 1, 1))
    cos = lambda a, b: (a * b).flatten(1).sum(1) / (norm(a) * norm(b))
    assert (cos(outputs[-1], steps[-2]) > 0.1).all()  # later steps keep memory of earlier ones
    sgd = pxp.GuidanceOptimizer("sgd")
    assert all(sgd.step(g) is g for g in steps)


def test_optimizer_flows_through_a_loop(classifier, inputs):
    x, kwargs = inputs
    model, plain = golden_model_and_diffusion("unet_a", timestep_respacing="4")
    _, momentum = golden_model_and_diffusion("unet_a", timestep_respacing="4", pxp_optimizer="momentum")
    cond_fn, noises = classifier_guidance(classifier, 10000.0), torch.randn(4, *x.shape)
    a = plain.p_sample_loop(model, x.shape, noise=x, cond_fn=cond_fn, model_kwargs=kwargs, step_noise=noises)
    b = momentum.p_sample_loop(model, x.shape, noise=x, cond_fn=cond_fn, model_kwargs=kwargs, step_noise=noises)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_mode_flags_flow_from_the_command_line():
    defaults = DEFAULTS["model"]()
    flags = parse_flags("--image_size 32 --num_channels 32 --channel_mult 1,2 --attention_resolutions 16 --pxp_mode cls_den --dweight 0.5", defaults)
    _, diffusion = create_model_and_diffusion(**flags)
    assert diffusion.pxp == pxp.PxPConfig(mode="cls_den", dweight=0.5, cweight=1.0, optimizer="sgd")
    _, diffusion = create_model_and_diffusion(**parse_flags("--pxp_window 0.5,1", flags))
    assert diffusion.pxp.window == (0.5, 1.0)
    for class_cond, recipe in [(True, "cls_den"), (False, "cls_den_div2")]:
        _, diffusion = create_model_and_diffusion(**{**flags, "pxp_mode": "auto", "class_cond": class_cond})
        assert diffusion.pxp.mode == recipe
    with pytest.raises(UsageError, match="unknown pxp_mode 'cls': use auto .* or one of none, cls_den"):
        create_model_and_diffusion(**{**flags, "pxp_mode": "cls"})
    with pytest.raises(UsageError, match="pxp_mode 'auto' depends on the model: resolve it with resolve_mode"):
        pxp.PxPConfig(mode="auto")
    with pytest.raises(UsageError, match="unknown pxp_optimizer"):
        create_model_and_diffusion(**{**flags, "pxp_optimizer": "lbfgs"})
    for window, message in [("0.5", "expected two fractions"), ("0.8,0.2", "need 0 <= lo < hi <= 1")]:
        with pytest.raises(UsageError, match=message):
            create_model_and_diffusion(**{**flags, "pxp_window": window})


def test_step_statistics_and_plot(tmp_path):
    recorder, other = pxp.StepStats(), pxp.StepStats()
    for t, rec in [(1, recorder), (0, recorder), (1, other)]:
        _, stats = pxp.combine(_directions(t), pxp.PxPConfig(mode="cls_den_div"))
        rec.add(t, stats)
    recorder.merge(other)
    steps = recorder.to_dict()["steps"]
    assert [s["t"] for s in steps] == [1, 0] and [s["samples"] for s in steps] == [12, 6]
    assert all(-1 <= s["cos_den_cls"] <= 1 and 0 <= s["fired_cls_den"] <= 1 for s in steps)
    pytest.importorskip("matplotlib")
    pxp.plot_stats(recorder.to_dict(), tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 1000
