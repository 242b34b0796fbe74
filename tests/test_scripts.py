"""The sampling scripts end to end on tiny seeded checkpoints: MPI, seeds, resume, outputs and bad input.

Every script runs in its own process, as a user runs it (most start warm: tests/warm_python.py; the
MPI, signal and kill runs start cold). The checkpoints are made in tests/script_runs.py (image
size 16, 32 channels) and carry their flags in a sidecar `<checkpoint>.json`.
"""

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from guided_diffusion import logger
from guided_diffusion.checkpoints import OFFICIAL, parse_flags
from guided_diffusion.flag_help import GROUPS
from guided_diffusion.sampling_networks import Checkpoint
from guided_diffusion.sampling_output import BORDER_GREY, GRID_BORDER
from guided_diffusion.script_util import model_and_diffusion_defaults
from script_runs import MODEL, guided_flags, official_meta, read_npz, run, script_command, script_env
import warm_python


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """classifier_sample.py in one process, batch size 2, with a 4x4 grid and PixelAsParam statistics."""
    out = tmp_path_factory.mktemp("reference")
    proc = run("classifier_sample.py", *guided_flags(models, out, "--batch_size", 2, "--grid_size", 4, "--pxp_stats", out / "stats.json"))
    return out, proc


@pytest.mark.slow
def test_reference_npz_layout(reference):
    out, _ = reference
    expected = read_npz(out / "samples_5x16x16x3.npz")
    assert set(expected) == {"arr_0", "arr_1"}
    assert expected["arr_0"].shape == (5, 16, 16, 3) and expected["arr_0"].dtype == np.uint8
    assert expected["arr_1"].dtype == np.int64 and ((expected["arr_1"] >= 0) & (expected["arr_1"] < 10)).all()
    assert expected["arr_0"].std() > 10  # real images, not a constant


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, ranks", [(3, 0), (2, 2)], ids=["batch_size_3", "mpiexec_2_ranks"])
def test_same_samples_whatever_the_ranks_and_batch_size(models, reference, tmp_path, batch_size, ranks):
    if ranks and shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    out, _ = reference
    run("classifier_sample.py", *guided_flags(models, tmp_path, "--batch_size", batch_size, "--pxp_stats", tmp_path / "stats.json"), mpi=ranks)
    expected, got = read_npz(out / "samples_5x16x16x3.npz"), read_npz(tmp_path / "samples_5x16x16x3.npz")
    np.testing.assert_array_equal(got["arr_0"], expected["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], expected["arr_1"])
    ref_steps = json.loads((out / "stats.json").read_text())["steps"]
    for ref_step, step in zip(ref_steps, json.loads((tmp_path / "stats.json").read_text())["steps"], strict=True):
        assert step == pytest.approx(ref_step, abs=1e-6)  # the same sums, added in another order


@pytest.mark.slow
def test_bad_input_on_one_rank_ends_every_rank(models, tmp_path):
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    # rank 1 starts in a folder without the checkpoint (as on a node that lacks the file): rank 0 must not wait forever
    command = script_command("classifier_sample.py", ["--model_path", "cond.pt", "--classifier_path", models["clf"], "--output", tmp_path])
    mpmd = ["mpiexec", "-n", "1", "-wdir", str(models["dir"]), *command, ":", "-n", "1", "-wdir", str(tmp_path), *command]
    proc = subprocess.run(mpmd, capture_output=True, text=True, env=script_env(), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("classifier_sample.py: error: (rank 1) checkpoint not found: cond.pt")


def test_png_grid_of_the_first_samples(reference):
    out, _ = reference
    images = read_npz(out / "samples_5x16x16x3.npz")["arr_0"]
    grid = np.asarray(Image.open(out / "samples_5x16x16x3.png"))
    b, cell = GRID_BORDER, 64 + GRID_BORDER  # tiles of 64 pixels with a grey line around each
    assert grid.shape == (b + 2 * cell, b + 4 * cell, 3)  # 5 samples in rows of 4, enlarged 4x
    tiles = images.repeat(4, axis=1).repeat(4, axis=2)
    np.testing.assert_array_equal(grid[b : b + 64, b + cell : b + cell + 64], tiles[1])
    np.testing.assert_array_equal(grid[b + cell : b + cell + 64, b : b + 64], tiles[4])
    assert (grid[:b] == BORDER_GREY).all() and (grid[b + cell :, b + cell :] == BORDER_GREY).all()  # the frame, the empty cells


def test_pxp_stats_json(reference):
    out, proc = reference
    steps = json.loads((out / "stats.json").read_text())["steps"]
    assert [s["t"] for s in steps] == [3, 2, 1, 0] and all(s["samples"] == 5 for s in steps)
    for s in steps:
        assert set(s) == {"t", "samples", "cos_den_cls", "cos_cls_div", "cos_den_div", "fired_cls_den", "fired_cls_div"}
        assert all(-1 <= s[k] <= 1 for k in s if k.startswith("cos_"))
        assert all(0 <= s[k] <= 1 for k in s if k.startswith("fired_"))
        assert s["fired_cls_div"] == 0  # auto on a class-conditional model is cls_den: no diversity projection
    assert "(flags from " in proc.stdout and "saved 5 samples to" in proc.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_file(models, tmp_path):
    flags = guided_flags(models, tmp_path / "killed", "--num_samples", 6, "--timestep_respacing", 10, "--batch_size", 1)
    run("classifier_sample.py", *guided_flags(models, tmp_path / "whole", "--num_samples", 6, "--timestep_respacing", 10, "--batch_size", 3))
    expected = read_npz(tmp_path / "whole" / "samples_6x16x16x3.npz")

    partial = tmp_path / "killed" / "samples_6x16x16x3.partial"
    proc = subprocess.Popen(script_command("classifier_sample.py", flags), env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(partial.glob("from_*.npz")):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    saved = sorted(p.name for p in partial.glob("from_*.npz"))
    assert 1 <= len(saved) < 6, saved  # killed after its first saved batch, before the end
    assert not (tmp_path / "killed" / "samples_6x16x16x3.npz").exists()

    other = run("classifier_sample.py", *flags[:-2], "--batch_size", 2, "--classifier_scale", 2, status=2)
    assert "holds an unfinished run with other flags (--classifier_scale 5.0 (now 2.0))" in other.stderr

    run("classifier_sample.py", *flags)
    got = read_npz(tmp_path / "killed" / "samples_6x16x16x3.npz")
    np.testing.assert_array_equal(got["arr_0"], expected["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], expected["arr_1"])
    assert not partial.exists()

    mtime = os.path.getmtime(tmp_path / "killed" / "samples_6x16x16x3.npz")
    again = run("classifier_sample.py", *flags)
    assert "already sampled: " in again.stdout and os.path.getmtime(tmp_path / "killed" / "samples_6x16x16x3.npz") == mtime


@pytest.mark.slow
def test_super_res_upsamples_base_samples_and_keeps_labels(models, tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "base.npz", base, np.array([3, 1, 4]))
    out = tmp_path / "up" / "upsampled.npz"
    run("super_res_sample.py", "--model_path", models["sr"], "--base_samples", tmp_path / "base.npz", "--num_samples", 4,
        "--batch_size", 3, "--timestep_respacing", 4, "--seed", 0, "--output", out)
    got = read_npz(out)
    assert got["arr_0"].shape == (4, 64, 64, 3) and got["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(got["arr_1"], [3, 1, 4, 3])  # sample i upsamples base image i mod 3
    assert np.asarray(Image.open(tmp_path / "up" / "upsampled.png")).shape == (64 + 2 * GRID_BORDER, 4 * 64 + 5 * GRID_BORDER, 3)


@pytest.mark.slow
def test_classifier_free_sample(models, tmp_path):
    run("classifier_free_sample.py", "--model_path", models["uncond"], "--cond_model_path", models["cond"], "--cond_model_scale", 2,
        "--num_samples", 3, "--batch_size", 3, "--timestep_respacing", 4, "--seed", 1, "--output", tmp_path, "--pxp_stats", tmp_path / "cfg.json")
    got = read_npz(tmp_path / "samples_3x16x16x3.npz")
    assert got["arr_0"].shape == (3, 16, 16, 3) and got["arr_1"].shape == (3,)
    steps = json.loads((tmp_path / "cfg.json").read_text())["steps"]
    assert len(steps) == 4 and set(steps[0]) == {"t", "samples", "cos_den_cls", "fired_cls_den"}


@pytest.mark.slow
def test_image_sample_unconditional_fp16_flags_on_cpu_ddim(models, tmp_path):
    proc = run("image_sample.py", "--model_path", models["uncond"], "--use_fp16", "True", "--use_ddim", "True", "--eta", 0.5,
               "--num_samples", 2, "--timestep_respacing", 4, OPENAI_LOGDIR=str(tmp_path))
    got = read_npz(tmp_path / "samples_2x16x16x3.npz")
    assert set(got) == {"arr_0"} and got["arr_0"].shape == (2, 16, 16, 3)  # no labels for an unconditional model
    assert "fp16 needs CUDA; running in float32 on cpu" in proc.stdout


@pytest.mark.slow
def test_official_checkpoints_are_recognised_without_flags(tmp_path):
    model = official_meta(tmp_path / "256x256_diffusion_uncond.pt", "256x256_diffusion_uncond.pt")
    classifier = official_meta(tmp_path / "256x256_classifier.pt", "256x256_classifier.pt")
    assert os.path.getsize(model) < 1e6
    (tmp_path / "samples_2x256x256x3.npz").touch()  # an empty file where the output goes: the flags found give its name, 256x256
    proc = run("classifier_sample.py", "--model_path", model, "--classifier_path", classifier, "--num_samples", 2, "--output", tmp_path, status=2)
    assert f"{tmp_path / 'samples_2x256x256x3.npz'} is there but is not a finished sample batch" in proc.stderr
    assert f"--model_path {model} (flags from the official 256x256_diffusion_uncond.pt / lsun_bedroom.pt" in proc.stdout
    assert f"--classifier_path {classifier} (flags from the official 256x256_classifier.pt)" in proc.stdout

    small = official_meta(tmp_path / "64x64_classifier.pt", "64x64_classifier.pt")
    proc = run("classifier_sample.py", "--model_path", model, "--classifier_path", small, "--output", tmp_path, status=2)
    assert f"--classifier_path {small} has image_size 64 but --model_path {model} has 256: they must match" in proc.stderr


def test_explicit_flags_override_the_checkpoint_flags(models, tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])
    defaults = model_and_diffusion_defaults()
    official = official_meta(tmp_path / "official.pt", "256x256_diffusion.pt")
    args = argparse.Namespace(model_path=official, **dict(defaults, timestep_respacing="25", num_channels=8))
    flags = Checkpoint(args, {"timestep_respacing"}, "model_path", "model", defaults).flags
    expected = parse_flags(OFFICIAL["256x256_diffusion.pt"][1], defaults)
    assert flags == dict(expected, timestep_respacing="25")  # num_channels was not given: the checkpoint's 256 wins
    tiny = Checkpoint(argparse.Namespace(model_path=models["cond"], **defaults), set(), "model_path", "model", defaults).flags
    assert tiny == parse_flags(f"{MODEL} --class_cond True", defaults)  # from the sidecar


def _base(path, size, labels=True):
    arrays = [np.zeros((2, size, size, 3), np.uint8)] + ([np.array([0, 1])] if labels else [])
    np.savez(path, *arrays)
    return path


ERRORS = {
    "missing_checkpoint": ("classifier_sample.py", lambda m, d: ["--model_path", d / "missing.pt", "--classifier_path", m["clf"]], "checkpoint not found: "),
    "truncated_checkpoint": ("image_sample.py", lambda m, d: ["--model_path", d / "truncated.pt"], "cannot read checkpoint "),
    "flags_do_not_fit": ("image_sample.py", lambda m, d: ["--model_path", m["cond"], "--num_channels", 64], "does not fit the model built from these flags: "),
    "classifier_of_another_size": (
        "classifier_sample.py", lambda m, d: ["--model_path", m["cond"], "--classifier_path", m["clf32"]], "has image_size 32 but --model_path"),
    "model_path_is_a_classifier": ("image_sample.py", lambda m, d: ["--model_path", m["clf"]], "is a classifier (says"),
    "num_samples_zero": ("image_sample.py", lambda m, d: ["--model_path", m["cond"], "--num_samples", 0], "--num_samples must be positive and at most 10,000,000 (got 0)"),
    "respacing": ("image_sample.py", lambda m, d: ["--model_path", m["cond"], "--timestep_respacing", 300], "--timestep_respacing '300' cannot be made from 100 steps"),
    # tests may run as root, which writes anywhere: a path under a regular file is unwritable for everyone
    "unwritable_output": ("image_sample.py", lambda m, d: ["--model_path", m["cond"], "--output", d / "truncated.pt" / "out"], "cannot write to the output folder"),
    "nan": ("image_sample.py", lambda m, d: ["--model_path", m["nan"], "--seed", 0], "NaN or infinite values at sampling step 1 of 4 (timestep index 3) in sample(s) 0, 1"),
    "base_of_wrong_size": (
        "super_res_sample.py", lambda m, d: ["--model_path", m["sr"], "--base_samples", _base(d / "b8.npz", 8)], "holds 8x8 images but the upsampler takes 16x16"),
    "base_without_labels": (
        "super_res_sample.py", lambda m, d: ["--model_path", m["sr"], "--base_samples", _base(d / "b16.npz", 16, labels=False)],
        "has no labels (arr_1) but the upsampler is class-conditional"),
    "labels_outside_the_classes": (
        "classifier_sample.py", lambda m, d: ["--model_path", m["cond"], "--classifier_path", m["clf"], "--labels", "3,10"],
        "--labels: class 10 is not one of the 10 classes (0..9)"),
    "labels_word": ("image_sample.py", lambda m, d: ["--model_path", m["cond"], "--labels", "odd"], "--labels must be random, cycle or a comma list of class ids"),
    "classifier_free_div_mode": (
        "classifier_free_sample.py", lambda m, d: ["--model_path", m["uncond"], "--cond_model_path", m["cond"], "--pxp_mode", "cls_den_div2"],
        "pxp_mode cls_den_div2 projects against div, which classifier-free guidance does not have: use none or cls_den"),
}


@pytest.fixture(scope="module")
def error_runs(models, tmp_path_factory):
    """Every bad-input run of ERRORS, two at a time."""
    d = tmp_path_factory.mktemp("errors")
    (d / "truncated.pt").write_bytes(open(models["cond"], "rb").read()[:5000])

    def one(case):
        script, flags, _ = ERRORS[case]
        flags = ["--num_samples", 2, "--timestep_respacing", 4, "--output", d / case, *flags(models, d)]  # the last value of a flag wins
        return warm_python.run(script_command(script, flags), env=script_env())

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(ERRORS, pool.map(one, ERRORS)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gives_one_line_and_status_2(error_runs, case):
    script, _, message = ERRORS[case]
    proc = error_runs[case]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and message in last, proc.stderr



# The newcomer's view (issue 14): where the samples go, what the run does, what each flag means.


@pytest.mark.slow
def test_default_output_is_found_again_and_failures_leave_no_folder(models, tmp_path):
    flags = ["--model_path", models["uncond"], "--num_samples", 2, "--timestep_respacing", 4, "--seed", 0]
    first = run("image_sample.py", *flags, cwd=tmp_path)
    path = re.search(r"^output: (samples/image_sample-[0-9a-f]{8}/samples_2x16x16x3\.npz)$", first.stdout, re.M).group(1)
    assert f"saved 2 samples to {path}" in first.stdout and (tmp_path / path).exists()
    again = run("image_sample.py", *flags, cwd=tmp_path)
    assert f"already sampled: {path}" in again.stdout
    other = run("image_sample.py", *flags[:-1], 1, cwd=tmp_path)  # another seed: another folder
    assert f"output: {path}" not in other.stdout and len(list((tmp_path / "samples").iterdir())) == 2

    failed = tmp_path / "failed"
    failed.mkdir()
    run("image_sample.py", "--model_path", models["dir"] / "missing.pt", cwd=failed, status=2)
    run("image_sample.py", *flags, "--timestep_respacing", 300, cwd=failed, status=2)  # fails after reading the checkpoint
    assert not list(failed.iterdir())  # no empty output folder left behind


@pytest.mark.slow
def test_banner_shows_the_effective_settings(tmp_path):
    # the embedded default's values give way to the typed ones, and the banner says so
    proc = run("classifier_sample.py", "--classifier_scale", 0, "--timestep_respacing", 10, "--num_samples", 4, "--labels", "1,7",
               "--output", tmp_path)
    settings = proc.stdout[proc.stdout.index("settings:") :]
    for shown in ("--timestep_respacing 10", "--classifier_scale 0.0", "--num_samples 4", "--pxp_mode cls_den_div2 (auto)", "--pxp_window 0.5,1", "--labels 1,7"):
        assert shown in settings
    assert "--timestep_respacing 100" not in settings and "--classifier_scale 1.0" not in settings
    assert f"output: {tmp_path / 'samples_4x8x8x3.npz'}" in settings
    assert read_npz(tmp_path / "samples_4x8x8x3.npz")["arr_1"].tolist() == [1, 7, 1, 7]  # a list of classes cycles


SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_with_its_default_in_a_group(script):
    parser = runpy.run_path(str(ROOT / "scripts" / script), run_name="help_check")["create_argparser"]()
    for group in parser._action_groups[2:]:  # after argparse's own positional and options groups
        assert group.title in GROUPS, group.title  # a flag missing from flag_help.HELP lands in "other"
        for action in group._group_actions:
            assert re.fullmatch(r"\S.* \(default: .+\)", action.help), (action.dest, action.help)
    assert all(a.dest == "help" for a in parser._action_groups[1]._group_actions)


@pytest.mark.slow
def test_help_shows_the_description_as_written():
    proc = run("classifier_sample.py", "--help")
    assert "--model_path models/64x64_diffusion.pt \\\n        --classifier_path models/64x64_classifier.pt" in proc.stdout
    assert re.search(r"--pxp_mode STR\s+how a guided step combines its directions: .*? \(default: auto\)", proc.stdout, re.S)
    assert "\nPixelAsParam:\n" in proc.stdout and "\nspeed:\n" in proc.stdout
    nll = run("image_nll.py", "--help")
    assert "summed over all\ntimesteps (MPI data-parallel)." in nll.stdout
