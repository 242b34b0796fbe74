"""Shared test helpers: where the reference fixtures live and how to compare with them."""

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def assert_close(actual, expected, atol=1e-4, rtol=1e-4):
    """The fixtures' float32 tolerance: |a - b| <= atol + rtol * |b|, elementwise."""
    actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="session")
def device():
    """Where tests that run networks run them: the GPU when there is one (in true float32: no TF32), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny checkpoints (with sidecars) the script tests run on, and their folder (see script_runs)."""
    from script_runs import CLASSIFIER, MODEL, UPSAMPLER, save_checkpoint

    d = tmp_path_factory.mktemp("models")
    nan_bias = lambda sd: sd["out.2.bias"].fill_(float("nan"))  # noqa: E731
    return dict(
        cond=save_checkpoint(d / "cond.pt", "model", f"{MODEL} --class_cond True", 0),
        uncond=save_checkpoint(d / "uncond.pt", "model", f"{MODEL} --class_cond False", 1),
        clf=save_checkpoint(d / "clf.pt", "classifier", f"--image_size 16 {CLASSIFIER}", 2),
        clf32=save_checkpoint(d / "clf32.pt", "classifier", f"--image_size 32 {CLASSIFIER}", 3),
        sr=save_checkpoint(d / "sr.pt", "sr", UPSAMPLER, 4),
        nan=save_checkpoint(d / "nan.pt", "model", f"{MODEL} --class_cond True", 0, edit=nan_bias),
        dir=d,
    )
