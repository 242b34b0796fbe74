"""The sampling scripts' speed options --autocast, --channels_last and --compile, on tiny seeded checkpoints."""

import numpy as np
import pytest
import torch

from conftest import assert_close
from guided_diffusion import harness, logger
from guided_diffusion.errors import UsageError
from guided_diffusion.sampling_flags import sampling_defaults, start
from guided_diffusion.sampling_networks import Checkpoint, classifier_guidance
from guided_diffusion.script_util import classifier_defaults, model_and_diffusion_defaults
from guided_diffusion.unet import UNetModel
from script_runs import CLASSIFIER, MODEL, read_npz, run, save_checkpoint


DEFAULTS = {"model": model_and_diffusion_defaults, "classifier": classifier_defaults}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    logger.configure(dir=str(d), format_strs=[])  # Checkpoint logs; not to a stdout that pytest has closed since
    return dict(
        model=save_checkpoint(d / "model.pt", "model", f"{MODEL} --class_cond True --use_fp16 True", 0),
        classifier=save_checkpoint(d / "classifier.pt", "classifier", f"--image_size 16 {CLASSIFIER}", 2),
    )


@pytest.fixture(scope="module")
def inputs(device):
    """x, t, y on the device the scripts' networks load to (the GPU when there is one)."""
    gen = torch.Generator().manual_seed(0)
    return tuple(v.to(device) for v in (torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([3, 60]), torch.tensor([1, 7])))


def load(checkpoints, kind, *flags):
    """The network of a checkpoint as a sampling script loads it, given the script's flags."""
    defaults = DEFAULTS[kind]()
    args = harness.create_argparser("", sampling_defaults(), defaults).parse_args(["--model_path", checkpoints[kind], *flags])
    return Checkpoint(args, set(), "model_path", kind, defaults).load()[0]


def outputs(checkpoints, inputs, *flags):
    """(UNet output, classifier guidance gradient) with the given flags."""
    x, t, y = inputs
    with torch.no_grad():
        eps = load(checkpoints, "model", *flags)(x, t, y=y)
    return eps, classifier_guidance(load(checkpoints, "classifier", *flags), 1.0)(x, t, y=y)


def test_off_by_default_the_networks_are_returned_as_they_are(checkpoints):
    assert type(load(checkpoints, "model")) is UNetModel


def test_autocast_must_name_a_dtype():
    parser = harness.create_argparser("", sampling_defaults())
    with pytest.raises(UsageError, match="--autocast must be bf16, fp16 or empty"):
        start(parser, ["--autocast", "fp8"])


@pytest.mark.parametrize("flags", [("--channels_last", "True"), pytest.param(("--compile", "True"), marks=pytest.mark.slow)], ids=["channels_last", "compile"])
def test_float32_options_keep_the_goldens_tolerance(checkpoints, inputs, flags):
    expected, got = outputs(checkpoints, inputs), outputs(checkpoints, inputs, *flags)
    assert got[0].is_contiguous()  # the UNet's output in the standard layout
    for actual, want in zip(got, expected):
        assert_close(actual, want)


def test_autocast_bf16_returns_float32_in_place_of_the_fp16_conversion(checkpoints, inputs):
    # the checkpoint says --use_fp16 True: under --autocast its weights stay float32 (on CUDA too)
    model = load(checkpoints, "model", "--autocast", "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    expected, got = outputs(checkpoints, inputs), outputs(checkpoints, inputs, "--autocast", "bf16", "--channels_last", "True")
    assert got[0].is_contiguous()
    for actual, want in zip(got, expected):
        assert actual.dtype == torch.float32
        assert ((actual - want).norm() / want.norm()).item() < 4e-2  # test_precision.py's bf16 tolerance


@pytest.mark.slow
def test_image_sample_with_speed_options(checkpoints, tmp_path):
    common = ["--model_path", checkpoints["model"], "--num_samples", 2, "--timestep_respacing", 4, "--seed", 3]
    run("image_sample.py", *common, "--output", tmp_path / "float32")
    run("image_sample.py", *common, "--autocast", "bf16", "--channels_last", "True", "--output", tmp_path / "bf16")
    float32, bf16 = (read_npz(tmp_path / name / "samples_2x16x16x3.npz")["arr_0"] for name in ("float32", "bf16"))
    assert bf16.shape == float32.shape == (2, 16, 16, 3)
    assert np.abs(bf16.astype(int) - float32).mean() < 2  # the same images, up to rounding in a few levels


def test_a_small_network_on_the_cpu_takes_one_thread_unless_omp_num_threads_says(checkpoints, monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        load(checkpoints, "model")
        assert torch.get_num_threads() == 2  # the user's setting stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        load(checkpoints, "model")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
