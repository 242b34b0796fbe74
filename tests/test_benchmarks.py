"""The benchmark scripts run in their quick modes."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import sample_speed  # noqa: E402


@pytest.mark.parametrize("options, title", [([], "cpu, float32,"), (["--dtype", "bf16", "--channels_last", "True"], "cpu, bf16, channels_last,")])
def test_sample_speed_quick(options, title):
    quick = ["--arch", "quick", "--device", "cpu", "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--modes", "none,cls_den_div2"]
    table = sample_speed.main(quick + options)
    assert title in table.splitlines()[0] and "GFLOP per step" in table.splitlines()[0]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| none") or line.startswith("| cls_den_div2")]
    assert len(rows) == 2
    assert float(rows[0][2]) > 0 and float(rows[0][4]) > 0  # ms/step and TFLOP/s
    assert "%" in rows[1][5] and "%" in rows[1][6]  # PxP overhead and combine share
