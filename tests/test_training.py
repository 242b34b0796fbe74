"""Training losses run and decrease on a tiny model; the likelihood loop runs."""

import pytest
import torch

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4", num_head_channels=32, diffusion_steps=100)


def _tiny(**overrides):
    flags = {**model_and_diffusion_defaults(), **TINY, **overrides}
    torch.manual_seed(0)
    return create_model_and_diffusion(**flags)


@pytest.mark.parametrize(
    "overrides, parts",
    [
        ({}, {"mse"}),
        ({"learn_sigma": True, "rescale_learned_sigmas": True}, {"mse", "vb"}),
        ({"learn_sigma": True, "use_kl": True}, set()),
    ],
    ids=["mse", "hybrid", "kl"],
)
def test_losses_decrease(overrides, parts):
    model, diffusion = _tiny(**overrides)
    data = torch.randn(2, 3, 1, 1).repeat(1, 1, 8, 8).clamp(-1, 1)  # two flat-colour images
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)

    def loss_at(step_model):
        t = torch.randint(0, diffusion.num_timesteps, (16,), generator=gen)
        noise = torch.randn(16, 3, 8, 8, generator=gen)
        return diffusion.training_losses(step_model, data.repeat(8, 1, 1, 1), t, noise=noise)

    def eval_loss():
        with torch.no_grad():
            return torch.stack([loss_at(model)["loss"].mean() for _ in range(4)]).mean().item()

    before = eval_loss()
    for _ in range(40):
        terms = loss_at(model)
        assert set(terms) == parts | {"loss"}
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_calc_bpd_loop():
    model, diffusion = _tiny(learn_sigma=True, diffusion_steps=25)
    out = diffusion.calc_bpd_loop(model, torch.rand(2, 3, 8, 8) * 2 - 1)
    assert out["vb"].shape == out["mse"].shape == (2, 25)
    assert torch.isfinite(out["total_bpd"]).all() and (out["total_bpd"] > 0).all()
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
