"""The small seeded networks reproduce the reference outputs; schedules and respacings match exactly."""

import numpy as np
import pytest
import torch

from conftest import assert_close
from guided_diffusion.fp16_util import use_fp16_if_supported
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.checkpoints import DEFAULTS, OFFICIAL, build, parse_flags
from helpers import NETS, golden_network, network_inputs, npz


@pytest.mark.parametrize("name", sorted(NETS))
def test_golden_network_outputs(name):
    net = golden_network(name)  # loads with strict=True
    x, t, kwargs = network_inputs(name)
    with torch.no_grad():
        out = net(x, t, **kwargs)
    assert_close(out, npz("golden_models")[f"{name}/out"])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 4000])
def test_beta_schedules(schedule, steps):
    np.testing.assert_array_equal(get_named_beta_schedule(schedule, steps), npz("golden_models")[f"betas/{schedule}/{steps}"])


@pytest.mark.parametrize("spec", ["250", "ddim25", "ddim50", "ddim250", "10,15,20", "27", "100,50", "1000"])
def test_respacing(spec):
    kept = sorted(space_timesteps(1000, spec))
    np.testing.assert_array_equal(kept, npz("golden_models")[f"respace/{spec}"])
    spaced = SpacedDiffusion(kept, betas=get_named_beta_schedule("linear", 1000), model_mean_type=None, model_var_type=None, loss_type=None)
    np.testing.assert_allclose(spaced.betas, npz("golden_models")[f"respace_betas/{spec}"], rtol=1e-12, atol=0)


@pytest.mark.slow
def test_official_64x64_flags_with_fp16_run_on_cpu(capsys):
    kind, flags = OFFICIAL["64x64_diffusion.pt"]
    flags = parse_flags(flags, DEFAULTS[kind]())
    assert flags["use_fp16"]
    torch.manual_seed(0)
    model = build(kind, flags).eval()
    assert not use_fp16_if_supported(model, flags["use_fp16"], "cpu")
    assert "fp16 needs CUDA; running in float32 on cpu" in capsys.readouterr().out
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.tensor([10]), y=torch.tensor([3]))
    assert out.shape == (1, 6, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fp16_conversion_is_the_originals():
    model = build("model", parse_flags("--image_size 32 --num_channels 32 --channel_mult 1,2 --attention_resolutions 16", DEFAULTS["model"]()))
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32  # linear layers stay float32
    assert model.time_embed[0].weight.dtype == model.out[2].weight.dtype == torch.float32
    model.convert_to_fp32()
    assert model.dtype == torch.float32
