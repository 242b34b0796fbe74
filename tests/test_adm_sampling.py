"""ADM and ADM-G sampling steps and loops reproduce the reference with the recorded noises."""

import pytest
import torch

from conftest import assert_close, assert_close_at
from helpers import classifier_grad_fn, golden_model_and_diffusion, golden_network, npz, tensor

SCALE = 10000.0


@pytest.fixture(scope="module")
def setup():
    model, diffusion = golden_model_and_diffusion("unet_a", timestep_respacing="25")
    cond_fn = classifier_grad_fn(golden_network("classifier"), SCALE)
    return model, diffusion, cond_fn, tensor("golden_sampling", "x"), {"y": tensor("golden_sampling", "y")}


def gold(key):
    return npz("golden_sampling")[key]


@pytest.mark.parametrize("t", [24, 12, 0])
def test_ddpm_steps(setup, t):
    model, diffusion, cond_fn, x, kwargs = setup
    ts, prefix = torch.full((3,), t), f"adm/r25/t{t}/"
    noise = tensor("golden_sampling", prefix + "noise")
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x, ts, model_kwargs=kwargs)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert_close_at(t, out[key], gold(prefix + "pmv/" + key))
        assert_close_at(t, diffusion.p_sample(model, x, ts, model_kwargs=kwargs, noise=noise)["sample"], gold(prefix + "ddpm_plain"))
        guided = diffusion.p_sample(model, x, ts, model_kwargs=kwargs, noise=noise, cond_fn=cond_fn)
    assert_close_at(t, guided["sample"], gold(prefix + "ddpm_cg"))
    assert "pxp" not in guided  # pxp_mode none is the plain ADM-G path


@pytest.mark.parametrize("t", [24, 12, 0])
@pytest.mark.parametrize("eta", [0, 1])
def test_guided_ddim_steps(setup, t, eta):
    model, diffusion, cond_fn, x, kwargs = setup
    prefix = f"adm/r25/t{t}/"
    with torch.no_grad():
        out = diffusion.ddim_sample(
            model, x, torch.full((3,), t), model_kwargs=kwargs, cond_fn=cond_fn, eta=float(eta), noise=tensor("golden_sampling", prefix + "noise")
        )
    assert_close_at(t, out["sample"], gold(prefix + f"ddim_cg_eta{eta}"))


def test_ddim5_loop(setup):
    _, _, cond_fn, x, kwargs = setup
    model, diffusion = golden_model_and_diffusion("unet_a", timestep_respacing="ddim5")
    sample = diffusion.ddim_sample_loop(model, x.shape, noise=tensor("golden_sampling", "adm/ddim5_loop/noise"), cond_fn=cond_fn, model_kwargs=kwargs)
    assert_close(sample, gold("adm/ddim5_loop/sample"))


@pytest.mark.parametrize("as_callable", [False, True])
def test_ddpm5_loop_with_recorded_noises(setup, as_callable):
    _, _, cond_fn, x, kwargs = setup
    model, diffusion = golden_model_and_diffusion("unet_a", timestep_respacing="5")
    noises = tensor("golden_sampling", "adm/ddpm5_loop/noises")
    step_noise = (lambda i: noises[4 - i]) if as_callable else noises  # callables get the timestep index
    sample = diffusion.p_sample_loop(model, x.shape, noise=x, cond_fn=cond_fn, model_kwargs=kwargs, step_noise=step_noise)
    assert_close(sample, gold("adm/ddpm5_loop/sample"))


def test_loops_draw_from_torch_generator_without_noise(setup):
    model, diffusion, _, x, kwargs = setup
    model5, diffusion5 = golden_model_and_diffusion("unet_a", timestep_respacing="2")
    torch.manual_seed(3)
    a = diffusion5.p_sample_loop(model5, (1, 3, 64, 64), model_kwargs={"y": kwargs["y"][:1]})
    torch.manual_seed(3)
    b = diffusion5.p_sample_loop(model5, (1, 3, 64, 64), model_kwargs={"y": kwargs["y"][:1]})
    assert torch.equal(a, b) and a.abs().max() <= 1.5
