"""The training scripts train tiny models under MPI and resume killed runs; image_nll and
prepare_digits run; the committed digits models load strictly from their sidecar flags."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from evaluations.digits_features import load_evaluator
from guided_diffusion.checkpoints import DEFAULTS, build, load_with_sidecar, parse_flags
from guided_diffusion.digits import digits_split
import warm_python

TINY_MODEL = (
    "--image_size 8 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 4 "
    "--num_head_channels 32 --learn_sigma True --diffusion_steps 20 --noise_schedule cosine --class_cond True --num_classes 10"
).split()
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def script(name, *flags, logdir=None, mpi=0, env=None, **kwargs):
    """The command and environment that run scripts/<name>.py (under `mpiexec -n mpi` when mpi)."""
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, flags)]
    if mpi:
        cmd = [MPIEXEC, "-n", str(mpi), *cmd]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if logdir:
        full_env["OPENAI_LOGDIR"] = str(logdir)
    return dict(args=cmd, env=full_env, cwd=ROOT, **kwargs)


def run_script(name, *flags, **kwargs):
    """Run a script to completion; returns the CompletedProcess (output captured as text)."""
    command = script(name, *flags, **kwargs)
    return warm_python.run(command["args"], env=command["env"], cwd=command["cwd"], timeout=120)


def progress(logdir):
    """The rows of a run's progress.csv."""
    with open(Path(logdir) / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    result = run_script("prepare_digits", "--out_dir", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_prepare_digits(digits):
    class_counts = {}
    for part, count in (("train", 1437), ("held_out", 360)):
        names = sorted(p.name for p in (digits / part).iterdir())
        assert len(names) == count and all(re.fullmatch(r"\d_\d{4}\.png", n) for n in names)
        batch = np.load(digits / f"{part}.npz")
        assert batch["arr_0"].shape == (count, 8, 8, 3) and batch["arr_0"].dtype == np.uint8
        assert len(np.unique(batch["arr_0"])) == 17  # the 17 gray levels
        assert [int(n[0]) for n in names] == sorted(batch["arr_1"].tolist())
        class_counts[part] = np.bincount(batch["arr_1"], minlength=10)
    total = class_counts["train"] + class_counts["held_out"]
    assert (np.abs(class_counts["held_out"] - 0.2 * total) <= 1).all()  # stratified


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_image_train_mpi_killed_run_resumes(digits, tmp_path):
    flags = [*TINY_MODEL, "--data_dir", digits / "held_out", "--random_flip", "False", "--batch_size", 4]
    flags += ["--microbatch", 2, "--schedule_sampler", "loss-second-moment", "--ema_rate", "0.9,0.99"]
    steps = 24
    flags += ["--lr_anneal_steps", steps, "--save_interval", 3, "--log_interval", 1]
    first = subprocess.Popen(**script("image_train", *flags, logdir=tmp_path, mpi=2, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    deadline = time.time() + 60
    while not (tmp_path / "model000006.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # mpiexec passes it on: both ranks die mid-run
    first.wait(timeout=30)
    assert first.returncode != 0 and not (tmp_path / f"model{steps:06d}.pt").exists(), first.stderr.read()
    resumed = max(int(p.name[5:11]) for p in tmp_path.glob("model*.pt"))
    assert resumed >= 6

    second = run_script("image_train", *flags, logdir=tmp_path, mpi=2)  # the same command again
    assert second.returncode == 0, second.stderr
    assert f"resuming from {tmp_path / f'model{resumed:06d}.pt'} (step {resumed})" in second.stdout
    rows = progress(tmp_path)[-(steps - resumed) :]
    assert [int(float(r["step"])) for r in rows] == list(range(resumed + 1, steps + 1))
    assert float(rows[-1]["samples"]) == steps * 4 * 2  # two ranks of 4 images a step
    assert (tmp_path / "log-rank001.txt").exists()
    for name in (f"model{steps:06d}.pt", f"ema_0.9_{steps:06d}.pt", f"ema_0.99_{steps:06d}.pt"):
        load_with_sidecar(tmp_path / name)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_classifier_train(digits, tmp_path):
    flags = ["--image_size", 8, "--num_classes", 10, "--classifier_channel_mult", "1,2", "--classifier_width", 32]
    flags += ["--classifier_depth", 1, "--classifier_attention_resolutions", 4, "--diffusion_steps", 20, "--noise_schedule", "cosine"]
    flags += ["--data_dir", digits / "held_out", "--val_data_dir", digits / "held_out", "--batch_size", 4]
    flags += ["--iterations", 4, "--eval_interval", 2, "--log_interval", 2, "--random_crop", "False", "--anneal_lr", "True"]
    result = run_script("classifier_train", *flags, logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = progress(tmp_path)
    assert [int(float(r["step"])) for r in rows] == [2, 4] and all(0 <= float(r["val_acc@1"]) <= 1 for r in rows)
    assert json.loads((tmp_path / "model000004.pt.json").read_text())["kind"] == "classifier"
    load_with_sidecar(tmp_path / "model000004.pt")
    load_with_sidecar(tmp_path / "ema_0.9999_000004.pt")


@pytest.mark.slow
def test_super_res_train(digits, tmp_path):
    flags = ["--large_size", 64, "--small_size", 32, "--num_channels", 32, "--num_res_blocks", 1, "--attention_resolutions", 8]
    flags += ["--diffusion_steps", 20, "--noise_schedule", "cosine", "--learn_sigma", "True", "--class_cond", "True", "--num_classes", 10]
    flags += ["--data_dir", digits / "held_out", "--batch_size", 2, "--lr_anneal_steps", 2, "--log_interval", 1]
    result = run_script("super_res_train", *flags, logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [int(float(r["step"])) for r in progress(tmp_path)] == [1, 2]
    load_with_sidecar(tmp_path / "model000002.pt")


@pytest.mark.slow
def test_image_nll(digits, tmp_path):
    flags = parse_flags(" ".join(TINY_MODEL), DEFAULTS["model"]())
    torch.manual_seed(0)
    model_path = tmp_path / "tiny.pt"
    torch.save(build("model", flags).state_dict(), model_path)
    model_path.with_name("tiny.pt.json").write_text(json.dumps({"kind": "model", "flags": " ".join(TINY_MODEL)}))
    result = run_script("image_nll", "--model_path", model_path, "--data_dir", digits / "held_out", "--num_samples", 4, "--batch_size", 2, logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    bpd = float(re.search(r"mean bpd over 4 images: ([\d.]+)", result.stdout).group(1))
    assert 0 < bpd < 100
    assert np.load(tmp_path / "vb_terms.npz")["arr_0"].shape == (20,)


@pytest.mark.parametrize(
    "name, flags, message",
    [
        ("image_train", ["--data_dir", "/nonexistent/digits", "--image_size", 8, "--channel_mult", "1,2"], "is not a folder"),
        ("classifier_train", ["--image_size", 8, "--classifier_channel_mult", "1,2"], "no --data_dir given"),
        ("image_nll", ["--data_dir", "/tmp"], "no --model_path given"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line(name, flags, message, tmp_path):
    result = run_script(name, *flags, logdir=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_committed_digits_models_load():
    for name, kind in (("cond", "model"), ("uncond", "model"), ("classifier", "classifier")):
        path = ROOT / "models" / f"digits_{name}.pt"
        assert json.loads(Path(f"{path}.json").read_text())["kind"] == kind
        assert path.stat().st_size < 6e6
        load_with_sidecar(path)
    images, labels, _ = digits_split()["held_out"]
    assert load_evaluator().accuracy(images, labels) > 0.97
