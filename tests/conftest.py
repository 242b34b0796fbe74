"""Shared test helpers: where the reference fixtures live and how to compare with them."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def assert_close(actual, expected, atol=1e-4, rtol=1e-4):
    """The fixtures' float32 tolerance: |a - b| <= atol + rtol * |b|."""
    actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


# The first step of the 25-step cosine schedule has alpha_bar = 2.4e-9, where recovering x0
# from eps multiplies float32 noise by sqrt(1/alpha_bar - 1) ~ 2e4: results there depend on
# the CPU's reduction order (thread count, instruction set) in a handful of pixels.
ILL_CONDITIONED_T = 24


def assert_close_at(t, actual, expected, bound=2e-3):
    """assert_close, except at the ill-conditioned first step: there 99.9% of values meet the
    fixtures' tolerance and every value is within `bound`."""
    if t != ILL_CONDITIONED_T:
        assert_close(actual, expected)
        return
    actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
    within = np.abs(actual - expected) <= 1e-4 + 1e-4 * np.abs(expected)
    assert within.mean() > 0.999, within.mean()
    np.testing.assert_allclose(actual, expected, atol=bound, rtol=1e-4)
