"""Training losses run and decrease on a tiny model; the likelihood loop runs; the training loop
and the fp16 trainer behave as upstream's (resume, master parameters, loss scaling)."""

import json
from pathlib import Path

import pytest
import torch

from guided_diffusion import fp16_util, logger
from guided_diffusion.train_util import find_resume_checkpoint, parse_resume_step_from_filename
from training_runs import tiny_model_and_diffusion, train_loop


@pytest.mark.parametrize(
    "overrides, parts",
    [
        ({}, {"mse"}),
        ({"learn_sigma": True, "rescale_learned_sigmas": True}, {"mse", "vb"}),
        ({"learn_sigma": True, "use_kl": True}, set()),
    ],
    ids=["mse", "hybrid", "kl"],
)
@pytest.mark.slow
def test_losses_decrease(overrides, parts):
    model, diffusion = tiny_model_and_diffusion(**overrides)
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
    model, diffusion = tiny_model_and_diffusion(learn_sigma=True, diffusion_steps=25)
    out = diffusion.calc_bpd_loop(model, torch.rand(2, 3, 8, 8) * 2 - 1)
    assert out["vb"].shape == out["mse"].shape == (2, 25)
    assert torch.isfinite(out["total_bpd"]).all() and (out["total_bpd"] > 0).all()
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])


# ---------------------------------------------------------------- TrainLoop and mixed precision


def test_train_loop_has_upstreams_attributes_and_resumes(tmp_path):
    upstream = json.loads((Path(__file__).with_name("upstream_api.json")).read_text())
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["csv"]):
        first = train_loop()
        missing = [a for a in upstream["modules"]["train_util"]["classes"]["TrainLoop"]["attributes"] if not hasattr(first, a)]
        assert not missing and first.use_ddp is False and first.sync_cuda is False and first.fp16_scale_growth == 1e-3
        assert find_resume_checkpoint() is None
        first.run_loop()
        assert find_resume_checkpoint() == str(tmp_path / "model000002.pt") == find_resume_checkpoint(str(tmp_path))
        resumed = train_loop(lr_anneal_steps=4)  # no resume_checkpoint: found in the log directory
    assert resumed.resume_step == 2
    saved = torch.load(tmp_path / "opt000002.pt", weights_only=True)
    assert torch.equal(resumed.opt.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    assert resumed.opt.state_dict()["state"][0]["step"] == saved["state"][0]["step"] == 2


def test_parse_resume_step_from_filename_is_upstreams():
    assert parse_resume_step_from_filename("/runs/models/model012345.pt") == 12345
    assert parse_resume_step_from_filename("ema_0.9999_000100.pt") == 0  # not a model checkpoint
    assert parse_resume_step_from_filename("256x256_diffusion.pt") == 0
    assert parse_resume_step_from_filename("model-epoch3.pt") == 0


def test_fp16_master_params_round_trip():
    model, _ = tiny_model_and_diffusion()
    groups = fp16_util.get_param_groups_and_shapes(model.named_parameters())
    assert [shape for _, shape in groups] == [-1, (1, -1)]
    assert all(p.ndim <= 1 for _, p in groups[0][0]) and all(p.ndim > 1 for _, p in groups[1][0])
    masters = fp16_util.make_master_params(groups)
    assert masters[0].ndim == 1 and masters[1].shape[0] == 1
    assert sum(m.numel() for m in masters) == sum(p.numel() for p in model.parameters())

    state = fp16_util.master_params_to_state_dict(model, groups, masters, use_fp16=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = fp16_util.state_dict_to_master_params(model, state, use_fp16=True)
    assert all(torch.equal(a, b) for a, b in zip(again, masters))

    with torch.no_grad():
        for m in masters:
            m.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp16_util.master_params_to_model_params(groups, masters)
    names = {n for n, _ in model.named_parameters()}
    assert all(torch.equal(v, before[k] + (k in names)) for k, v in model.state_dict().items())

    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    fp16_util.model_grads_to_master_grads(groups, masters)
    assert all(torch.equal(m.grad, torch.full_like(m, 2.0)) for m in masters)
    fp16_util.zero_master_grads(masters)
    assert all(m.grad is None for m in masters)
    fp16_util.zero_grad(model.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())

    plain = list(model.parameters())
    state = fp16_util.master_params_to_state_dict(model, None, plain, use_fp16=False)
    assert all(state[n] is p for (n, p) in model.named_parameters())
    assert all(a is state[n] for a, (n, _) in zip(fp16_util.state_dict_to_master_params(model, state, False), model.named_parameters()))


def test_fp16_trainer_steps_and_backs_off_on_overflow(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    trainer = fp16_util.MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=10.0)
    assert model.input_blocks[0][0].weight.dtype == torch.float16 and len(trainer.master_params) == 2
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([10, 60])
    with logger.scoped_configure(dir=str(tmp_path), format_strs=[]):
        trainer.zero_grad()
        trainer.backward(diffusion.training_losses(model, x, t)["loss"].mean())
        before = model.input_blocks[0][0].weight.detach().clone()
        assert trainer.optimize(opt)
        assert trainer.lg_loss_scale == 10.0 + trainer.fp16_scale_growth
        assert not torch.equal(model.input_blocks[0][0].weight, before)
        assert len(opt.state_dict()["state"]) == 2  # the layout of upstream's fp16 optimizer files

        trainer.zero_grad()
        trainer.backward(diffusion.training_losses(model, x, t)["loss"].mean() * float("inf"))
        assert not trainer.optimize(opt)
        assert trainer.lg_loss_scale == 9.0 + trainer.fp16_scale_growth
    assert fp16_util.check_overflow(float("nan")) and fp16_util.check_overflow(-float("inf")) and not fp16_util.check_overflow(3.0)
