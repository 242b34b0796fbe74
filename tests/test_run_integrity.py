"""Attacks on the sampling driver (issue 10): no rerun may take, mix or lose samples silently, and bad
files, full disks, absurd counts and Ctrl-C give one line, never a traceback.

The scripts run in their own processes on script_runs.py's tiny seeded checkpoints; the disk-full and
memory checks run in this process with the driver's own objects.
"""

import argparse
import errno
import fcntl
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.errors import UsageError
from guided_diffusion.pixel_as_param import StepStats
from script_runs import MODEL, guided_flags, read_npz, run, save_checkpoint, script_command, script_env
import warm_python


NAME = "samples_6x16x16x3"


def _flags(models, out, *extra):
    """classifier_sample.py's flags for 6 seeded samples, one per batch, slow enough to interrupt after the first."""
    return guided_flags(models, out, "--num_samples", 6, "--batch_size", 1, "--timestep_respacing", 10, *extra)


def _interrupt(command, partial, group=False):
    """Start a command, send SIGINT once its first batch is saved (to its process group if group); (status, stdout, stderr)."""
    proc = subprocess.Popen(command, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while proc.poll() is None and not list(partial.glob("from_*.npz")) and time.time() < deadline:
        time.sleep(0.005)
    (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _last_line(proc):
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory):
    """A finished run of _flags (batch size 3): its folder, flags and samples."""
    out = tmp_path_factory.mktemp("finished")
    flags = _flags(models, out, "--batch_size", 3)
    run("classifier_sample.py", *flags)
    return out, flags, read_npz(out / f"{NAME}.npz")


# 2. A finished output counts as done only if it is this run's.


@pytest.mark.slow
def test_output_carries_its_fingerprint(finished, models):
    out, _, _ = finished
    record = json.loads((out / f"{NAME}.npz.json").read_text())
    assert record["--seed"] == 7 and record["--classifier_scale"] == 5.0 and "--batch_size" not in record
    assert record["--model_path --num_channels"] == 32  # resolved from the sidecar, not the script's default 128
    assert record["--model_path sha256"] == _sha256(models["cond"]) and record["--classifier_path sha256"] == _sha256(models["clf"])
    assert record["version"]


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_rerun_with_other_settings_refuses(finished):
    out, flags, _ = finished
    proc = run("classifier_sample.py", *flags, "--seed", 8, status=2)
    assert _last_line(proc).endswith(f"{out / NAME}.npz holds samples of other settings (--seed 7 (now 8)): delete it or choose another --output")
    same = run("classifier_sample.py", *flags, "--batch_size", 2)  # the batch size does not change the samples
    assert "already sampled" in same.stdout


@pytest.mark.slow
@pytest.mark.parametrize("what", ["garbage", "folder"])
def test_unreadable_output_is_never_done(models, tmp_path, what):
    path = tmp_path / "out.npz"
    path.mkdir() if what == "folder" else path.write_bytes(b"not an npz")
    proc = run("classifier_sample.py", *_flags(models, path), status=2)
    expected = f"--output {path} is a folder" if what == "folder" else f"{path} is there but is not a finished sample batch"
    assert expected in _last_line(proc) and " samples on " not in proc.stdout  # refused before any sampling


# 3, 4, 8. Resume: the same checkpoints and flags only, any batch size, Ctrl-C in one line.


@pytest.mark.slow
def test_interrupted_run_resumes_only_with_the_same_checkpoints(models, finished, tmp_path):
    model = tmp_path / "model.pt"
    shutil.copy(models["cond"], model)
    sidecar = tmp_path / "model.pt.json"
    shutil.copy(f"{models['cond']}.json", sidecar)
    flags = _flags(models, tmp_path / "out", "--model_path", model)
    partial = tmp_path / "out" / f"{NAME}.partial"

    status, _, err = _interrupt(script_command("classifier_sample.py", flags), partial)
    assert status == 130 and "Traceback" not in err, err
    saved = len(list(partial.glob("from_*.npz")))
    assert 1 <= saved < 6
    assert err.strip().splitlines()[-1] == (
        f"classifier_sample.py: interrupted: {saved} of 6 samples are saved in {partial}: run the same command to continue"
    )
    assert "--batch_size" not in json.loads((partial / "run.json").read_text())

    save_checkpoint(model, "model", f"{MODEL} --class_cond True", seed=5)  # another model, same flags, at the same path
    proc = run("classifier_sample.py", *flags, status=2)
    assert f"{partial} holds an unfinished run with other flags (--model_path sha256 " in _last_line(proc)
    shutil.copy(models["cond"], model)

    sidecar.write_text(json.dumps({"kind": "model", "flags": f"{MODEL} --class_cond True --dropout 0.1"}))
    proc = run("classifier_sample.py", *flags, status=2)
    assert "(--model_path --dropout 0.0 (now 0.1))" in _last_line(proc)
    shutil.copy(f"{models['cond']}.json", sidecar)

    run("classifier_sample.py", *flags, "--batch_size", 4)  # another batch size continues the same progress
    got, expected = read_npz(tmp_path / "out" / f"{NAME}.npz"), finished[2]
    np.testing.assert_array_equal(got["arr_0"], expected["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], expected["arr_1"])
    assert not partial.exists()


@pytest.mark.slow
def test_ctrl_c_under_mpiexec_ends_every_rank_in_one_line(models, tmp_path):
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    partial = tmp_path / f"{NAME}.partial"
    status, _, err = _interrupt(script_command("classifier_sample.py", _flags(models, tmp_path), mpi=2), partial, group=True)
    assert status == 130 and "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("classifier_sample.py:")]
    saved = sum(len(np.load(p)["index"]) for p in partial.glob("from_*.npz"))
    assert ours == [f"classifier_sample.py: interrupted: {saved} of 6 samples are saved in {partial}: run the same command to continue"]


@pytest.mark.slow
def test_overlapping_batches_take_each_sample_once(models, finished, tmp_path):
    # what two runs with other batch sizes leave behind: files that share samples
    partial = tmp_path / f"{NAME}.partial"
    flags = _flags(models, tmp_path)
    _interrupt(script_command("classifier_sample.py", flags), partial)
    reference = finished[2]
    first = sorted(partial.glob("from_*.npz"))[0]
    shutil.copy(first, partial / "from_000000099.npz")  # the same batch twice
    stats = np.array(json.dumps({"sums": {}, "counts": {}}))
    np.savez(partial / "from_000000098.npz", arr_0=reference["arr_0"][:3], arr_1=reference["arr_1"][:3], index=np.arange(3), stats=stats)
    run("classifier_sample.py", *flags)
    got = read_npz(tmp_path / f"{NAME}.npz")
    np.testing.assert_array_equal(got["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], reference["arr_1"])


@pytest.mark.slow
def test_a_second_run_is_told_who_holds_the_progress_folder(models, tmp_path):
    partial = tmp_path / f"{NAME}.partial"
    partial.mkdir()
    with open(partial / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        lock.flush()
        proc = run("classifier_sample.py", *_flags(models, tmp_path), status=2)
    assert _last_line(proc) == (
        f"classifier_sample.py: error: {partial} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}): "
        "wait for it to end, or stop it"
    )


@pytest.mark.slow
def test_progress_left_by_a_kill_after_the_final_rename_is_removed(finished, tmp_path):
    out, flags, _ = finished
    stale = out / f"{NAME}.partial"
    stale.mkdir()
    (stale / "run.json").write_text("{}")
    proc = run("classifier_sample.py", *flags)
    assert "already sampled" in proc.stdout and not stale.exists()


# 6. Memory does not grow with --num_samples; the final .npz is streamed.


@pytest.mark.slow
def test_absurd_sample_count_is_refused(models, tmp_path):
    proc = run("classifier_sample.py", *_flags(models, tmp_path, "--num_samples", "99999999999999999999"), status=2)
    assert "--num_samples must be positive and at most 10,000,000 (got 99999999999999999999)" in _last_line(proc)


def test_work_is_planned_lazily():
    from guided_diffusion.sampling import _plan

    saved = np.zeros(10_000_000, dtype=bool)
    saved[:5] = saved[7] = True
    batches = _plan(saved, 4)
    assert [next(batches) for _ in range(2)] == [[5, 6], [8, 9, 10, 11]]  # the first batches at once, without a list of all


@pytest.fixture
def one_rank():
    """A process group of this process alone, as the scripts have."""
    dist_util.setup_dist()
    yield
    dist.destroy_process_group()


def _output(tmp_path, num_samples, image_size, labelled=True):
    """An Output claimed in this process, with its progress folder opened."""
    from guided_diffusion.sampling_output import Output

    logger.configure(dir=str(tmp_path), format_strs=[])
    args = argparse.Namespace(output=str(tmp_path / "out.npz"), seed=0, num_samples=num_samples)
    out = Output(args, num_samples, image_size, [])
    assert out.claim()
    out.progress.open(num_samples, (image_size, image_size, 3), labelled)
    return out


def _batch(first, count, size):
    rng = np.random.default_rng(first)
    index = np.arange(first, first + count)
    return dict(index=index, images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), labels=index % 10, stats=StepStats())


def test_final_npz_is_streamed_from_the_saved_batches(one_rank, tmp_path):
    num, size, batch = 2000, 64, 16
    out = _output(tmp_path, num, size)
    for first in range(0, num, batch):
        out.progress.save(_batch(first, batch, size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write(grid_size=0)
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    total = num * size * size * 3
    assert peak_growth < total / 4, (peak_growth, total)  # the whole array (24 MB) is never in memory
    with zipfile.ZipFile(out.path) as archive:
        assert archive.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    got = read_npz(out.path)
    np.testing.assert_array_equal(got["arr_0"][1234], _batch(1232, batch, size)["images"][2])
    np.testing.assert_array_equal(got["arr_1"], np.arange(num) % 10)


# 7. One line, never a traceback.


def test_disk_full_says_so_and_keeps_what_was_saved(one_rank, tmp_path, monkeypatch):
    out = _output(tmp_path, 4, 8)
    out.progress.save(_batch(0, 2, 8))

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", full)
    with pytest.raises(UsageError, match=r"cannot save a batch in .* \(.*No space left on device.*\): the 2 samples saved there are kept"):
        out.progress.save(_batch(2, 2, 8))
    monkeypatch.undo()
    out.progress.save(_batch(2, 2, 8))
    monkeypatch.setattr(zipfile._ZipWriteFile, "write", full)
    with pytest.raises(UsageError, match=r"cannot write .*out\.npz \(.*No space left on device.*\): the saved samples in .* are kept"):
        out.write(grid_size=0)
    assert sorted(os.listdir(out.partial)) == ["from_000000000.npz", "from_000000002.npz", "lock", "run.json"]
    assert not os.path.exists(out.path) and not [n for n in os.listdir(tmp_path) if "tmp" in n]


def _bad_batches(size):
    """Batch files that must be refused, by what is wrong with them (arrays for np.savez, or raw bytes)."""
    good = dict(arr_0=np.zeros((2, size, size, 3), np.uint8), arr_1=np.array([1, 2]), index=np.array([0, 1]), stats=np.array(json.dumps({"sums": {}, "counts": {}})))
    buffer = io.BytesIO()
    np.savez(buffer, **good)
    return {
        "truncated": buffer.getvalue()[: len(buffer.getvalue()) // 2],
        "empty": b"",
        "wrongly_shaped": dict(good, arr_0=np.zeros((2, size + 1, size, 3), np.uint8)),
        "label_less": {k: v for k, v in good.items() if k != "arr_1"},
        "float_images": dict(good, arr_0=np.zeros((2, size, size, 3), np.float32)),
    }


def _bad_setup(d, case, interrupted):
    """The output folder of a run whose progress folder (an interrupted run's) holds a bad run.json or batch file."""
    partial = d / case / f"{NAME}.partial"
    shutil.copytree(interrupted, partial)
    if case == "corrupt_run_json":
        (partial / "run.json").write_text('{"--seed": 7, ')
        return partial / "run.json"
    if case == "batches_without_run_json":
        os.remove(partial / "run.json")
        return partial
    path = partial / "from_000000099.npz"
    content = _bad_batches(16)[case]
    path.write_bytes(content) if isinstance(content, bytes) else np.savez(path, **content)
    return path


BAD_FILES = {
    "corrupt_run_json": "cannot read {path} (",
    "batches_without_run_json": "holds saved batches but no run.json saying which settings made them: delete the folder",
    "truncated": "saved batch {path} is unusable: ",
    "empty": "saved batch {path} is unusable: ",
    "wrongly_shaped": "saved batch {path} is unusable: its images are 17x16x3, this run makes 16x16x3; delete it to sample that batch again",
    "label_less": "saved batch {path} is unusable: it has no labels (arr_1); delete it to sample that batch again",
    "float_images": "saved batch {path} is unusable: arr_0 must be uint8 images, got dtype float32; delete it to sample that batch again",
}


def _garbage(path):
    path.write_bytes(b"\xff" * 64)
    return path


def _folder(path):
    path.mkdir()
    return path


def _tiny(models, d):
    return ["--model_path", models["cond"], "--classifier_path", models["clf"], "--num_samples", 2, "--timestep_respacing", 4, "--output", d]


BAD_FLAGS = {
    "respacing_zero": (lambda m, d: [*_tiny(m, d), "--timestep_respacing", 0], "--timestep_respacing must be a positive step count (250), counts per section (10,20) or ddimN (got '0')"),
    "respacing_negative": (lambda m, d: [*_tiny(m, d), "--timestep_respacing", -5], "(got '-5')"),
    "pxp_stats_folder": (lambda m, d: [*_tiny(m, d), "--pxp_stats", d], "--pxp_stats {d} is a folder: name a file"),
    "checkpoint_folder": (lambda m, d: [*_tiny(m, d), "--model_path", d], "checkpoint {d} is a directory"),
    "safetensors_header": (lambda m, d: [*_tiny(m, d), "--model_path", _garbage(d / "bad.safetensors")], "bad .safetensors header"),
    "output_folder_at_npz_name": (lambda m, d: [*_tiny(m, d), "--num_samples", 6, "--output", _folder(d / f"{NAME}.npz").parent],
                                  f"{{d}}/{NAME}.npz is a folder, not a finished sample batch: delete it or choose another --output"),
}


@pytest.fixture(scope="module")
def bad_runs(models, tmp_path_factory):
    """classifier_sample.py with each bad progress file and each bad flag, two at a time."""
    d = tmp_path_factory.mktemp("bad")
    interrupted = d / "interrupted" / f"{NAME}.partial"
    _interrupt(script_command("classifier_sample.py", _flags(models, d / "interrupted")), interrupted)

    def one(case):
        (d / case).mkdir(exist_ok=True)
        if case in BAD_FILES:
            flags, message = _flags(models, d / case), BAD_FILES[case].format(path=_bad_setup(d, case, interrupted))
        else:
            make_flags, message = BAD_FLAGS[case]
            flags, message = make_flags(models, d / case), message.format(d=d / case)
        proc = warm_python.run(script_command("classifier_sample.py", flags), env=script_env())
        return proc, message

    cases = [*BAD_FILES, *BAD_FLAGS]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(cases, pool.map(one, cases)))


@pytest.mark.slow
@pytest.mark.parametrize("case", [*BAD_FILES, *BAD_FLAGS])
def test_bad_file_or_flag_is_one_line_before_any_sampling(bad_runs, case):
    proc, message = bad_runs[case]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = _last_line(proc)
    assert last.startswith("classifier_sample.py: error: ") and message in last, last
    assert " samples on " not in proc.stdout  # found before any sampling
