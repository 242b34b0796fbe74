"""benchmarks/gpu_check.sh: its one-line refusal without a GPU, its parsers, and a dry run of every piece on the CPU."""

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT
import warm_python

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import sample_speed  # noqa: E402


def test_the_readme_flag_string_is_found():
    flags = gpu_check.readme_flags()
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--image_size"] == "256" and pairs["--use_fp16"] == "True" and pairs["--classifier_scale"] == "1.0"
    assert "--model_path" not in pairs and "--classifier_path" not in pairs and len(flags) % 2 == 0


def test_the_speed_table_and_the_evaluator_line_are_read():
    args = argparse.Namespace(arch="256", batch_size=8, device="cuda", channels_last=False, compile=False, timestep_respacing="250",
                              timestep=125, repeats=5, objectives=1)
    timings = dict(rows=[("none", 0.05, 1e-4, 2e-4), ("cls_den", 0.052, 1e-4, 2e-4)], dtype="bf16", flops=4e13, peak=8e14)
    title, rows = gpu_check.parse_speed_table(sample_speed.format_table(args, timings))
    assert title.startswith("arch 256, batch 8, cuda, bf16")
    assert [r["pxp_mode"] for r in rows] == ["none", "cls_den"]
    assert rows[0]["ms/step"] == "50.0" and rows[0]["% of matmul rate"] == "100.0%"
    assert gpu_check.parse_evaluator_line("64 images of 256x256, batch 32, cuda, 16 threads: best 812.5 images/s, median 790.1 images/s") == (812.5, 790.1)
    assert gpu_check.parse_evaluator_line("Traceback") is None


@pytest.mark.slow
def test_without_a_gpu_it_fails_in_one_line(tmp_path):
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu_check: no CUDA GPU here")
    assert not (tmp_path / "out").exists()


def _warm(command, cwd, env, timeout, **_):
    """gpu_check's subprocess.run, with its `python piece.py` processes started warm."""
    return warm_python.run(command, env=env, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_a_dry_run_of_every_piece_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "subprocess", SimpleNamespace(run=_warm, TimeoutExpired=subprocess.TimeoutExpired))
    status = gpu_check.main([str(tmp_path), "--device", "cpu", "--quick", "--pytest", "tests/test_dpm_solver.py -k coefficients"])
    stdout = capsys.readouterr().out
    assert status == 0, stdout + (tmp_path / "gpu_check.json").read_text()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["environment"]["device"] == "cpu"
    assert report["tests"]["tests"] == 1 and report["tests"]["failures"] == 0
    for precision in ("fp16", "bf16"):
        assert report["sampling"][precision]["finite"] and report["sampling"][precision]["mean_abs_levels"] <= gpu_check.CLOSE_LEVELS[precision]
    assert [(r["dtype"], r["batch_size"]) for r in report["sample_speed"]["runs"]] == [("fp16", 2), ("bf16", 2)]
    assert all(float(r["rows"][0]["ms/step"]) > 0 for r in report["sample_speed"]["runs"])
    assert report["evaluator"]["best_images_per_s"] > 0
    assert "gpu_check on cpu: PASSED" in stdout
