"""The benchmark scripts run in their quick modes."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import sample_speed  # noqa: E402


def test_sample_speed_quick():
    table = sample_speed.main(["--arch", "quick", "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--modes", "none,cls_den_div2"])
    rows = [line for line in table.splitlines() if line.startswith("| none") or line.startswith("| cls_den_div2")]
    assert len(rows) == 2
    assert float(rows[0].split("|")[2]) > 0 and "%" in rows[1]
