"""Reduced precision agrees with float32 on a small model: autocast bf16 and fp16, and ADM's fp16 conversion.

The networks are a small UNet and classifier (32x32, 32 channels, attention at 16x16 and in
the middle block; sample_speed's quick architecture) with seeded weights, on CUDA when present,
else on the CPU (whose PyTorch kernels take float16 too). Errors are relative L2 norms, ||low - float32|| / ||float32||.

Tolerances: a value rounded to bf16 keeps 8 significant bits (unit roundoff 2^-9, about
2e-3), to fp16 11 bits (2^-12, about 2.4e-4). Through the network's ~20 layers the roundings
add up, measured on CPU, to 1.4e-2 (UNet output) and 2.2e-2 (classifier gradient) in bf16;
in fp16 to 1.7e-3 under autocast and 3.5e-3 (classifier gradient) with the conversion, which
keeps the residual stream in fp16. The tolerances, 4e-2 and 7e-3, leave a margin of about 2.
"""

import copy

import pytest
import torch

from guided_diffusion.checkpoints import DEFAULTS, build, parse_flags
from guided_diffusion.sampling_networks import classifier_guidance, speed_up
from guided_diffusion.script_util import create_gaussian_diffusion, randomize_zeroed_convs

MODEL = "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 --num_head_channels 32 --class_cond True --learn_sigma True"
CLASSIFIER = "--image_size 32 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 --classifier_channel_mult 1,2"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {"bf16": 4e-2, "fp16": 7e-3}
PRECISIONS = [pytest.param(dtype, method, id=f"{dtype}_{method}") for dtype, method in [("bf16", "autocast"), ("fp16", "autocast"), ("fp16", "conversion")]]


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    nets = [randomize_zeroed_convs(build(kind, parse_flags(flags, DEFAULTS[kind]()))) for kind, flags in [("model", MODEL), ("classifier", CLASSIFIER)]]
    return tuple(net.to(DEVICE).eval() for net in nets)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen).to(DEVICE)
    return x, torch.randint(0, 1000, (4,), generator=gen).to(DEVICE)


def reduced(net, dtype, method):
    """net computing in dtype: under autocast, or with ADM's conversion of its convolutions."""
    if method == "autocast":
        return speed_up(net, dtype)
    converted = copy.deepcopy(net)
    converted.convert_to_fp16()
    return converted


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def float32_reference(fn):
    """fn() in true float32 (no TF32 convolutions on CUDA)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return fn()


@pytest.mark.parametrize("dtype, method", PRECISIONS)
def test_unet_output(networks, inputs, dtype, method):
    model, _ = networks
    x, y = inputs
    t = torch.full((len(x),), 500, device=DEVICE)
    with torch.no_grad():
        expected = float32_reference(lambda: model(x, t, y=y))
        actual = reduced(model, dtype, method)(x, t, y=y)
    assert actual.dtype == torch.float32  # what the diffusion arithmetic gets
    assert relative_error(actual, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype, method", PRECISIONS)
@pytest.mark.parametrize("pxp_mode", ["none", "cls_den_div2"])
def test_guided_step(networks, inputs, dtype, method, pxp_mode):
    """One classifier-guided step (scale 10): the classifier's gradient, and the step's move x_{t-1} - x_t."""
    model, classifier = networks
    x, y = inputs
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="250", pxp_mode=pxp_mode)
    t = torch.full((len(x),), 125, device=DEVICE)

    def step(model, classifier):
        cond_fn = classifier_guidance(classifier, 10.0)
        gradient = cond_fn(x, t, y=y)
        with torch.no_grad():  # without the random part, which is the same in both
            sample = diffusion.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs={"y": y}, noise=torch.zeros_like(x))["sample"]
        return gradient, sample

    expected_gradient, expected = float32_reference(lambda: step(model, classifier))
    gradient, sample = step(reduced(model, dtype, method), reduced(classifier, dtype, method))
    assert gradient.dtype == sample.dtype == torch.float32
    assert relative_error(gradient, expected_gradient) < TOLERANCE[dtype]
    assert relative_error(sample - x, expected - x) < TOLERANCE[dtype]
