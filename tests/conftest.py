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
