"""The evaluator and make_ref_batch under attack: files that would run code, forged headers, NaN statistics,
outputs that would destroy inputs, a full disk, Ctrl-C; and their help text."""

import errno
import os
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT

if str(ROOT) not in sys.path:  # `evaluations` is imported from the repository, not installed
    sys.path.insert(0, str(ROOT))

from evaluations import digits_features, evaluator, inception, make_ref_batch
from guided_diffusion import npz_io


class Marker:
    """Pickles to a call that creates a file: proof of whether a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def images(n, seed=0, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def run_main(module, argv, capsys):
    """(exit status, stdout, stderr) of an in-process `main(argv)`."""
    status = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def error_line(err):
    """The single `error: ...` line that ends stderr (a progress bar may come before), with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def forged_npz(path, shape, data):
    """An .npz whose arr_0 header declares `shape` (uint8) but holds only the bytes `data`."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(data)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "seeded-inception.pth"
    torch.save(inception.seeded_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches")
    np.savez(folder / "ref.npz", images(6, seed=1))
    np.savez(folder / "sample.npz", images(6, seed=2))
    return {name: folder / f"{name}.npz" for name in ("ref", "sample")}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache that cannot download: any use of the default weights fails at once."""

    def no_network(url, dst, *args, **kwargs):
        raise OSError("offline test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(inception, "download_url_to_file", no_network)


# ---------------------------------------------------------------- nothing a user names runs code


@pytest.mark.parametrize("where", ["--inception_path", "torch hub cache"])
def test_inception_pickle_with_code_is_refused_unrun(tmp_path, batches, monkeypatch, capsys, where):
    marker = tmp_path / "ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    evil = tmp_path / "evil.pth" if where == "--inception_path" else tmp_path / "torch-home" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    evil.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": Marker(marker)}, evil)
    flags = ["--inception_path", evil] if where == "--inception_path" else []
    status, out, err = run_main(evaluator, [batches["ref"], batches["sample"], *flags], capsys)
    assert not marker.exists()
    assert status == 1 and out == ""
    line = error_line(err)
    assert f"{evil}: not a usable InceptionV3 weights file (" in line and "refused" in line
    assert "weights_only" not in line


@pytest.mark.parametrize("member", ["arr_0", "mu"])
def test_object_array_in_npz_is_refused_unread(tmp_path, batches, capsys, member):
    marker = tmp_path / "ran"
    objects = np.array([Marker(marker)] * 4, dtype=object)
    arrays = {"arr_0": images(4), "sigma": np.eye(2048, dtype=np.float32), "mu": np.zeros(2048)}
    arrays[member] = objects
    np.savez(tmp_path / "objects.npz", **arrays)  # savez pickles object arrays; reading must not unpickle
    status, _, err = run_main(evaluator, [tmp_path / "objects.npz", batches["sample"]], capsys)
    assert status == 1
    assert f"objects.npz: {member} is an array of Python objects" in error_line(err)
    assert not marker.exists()


def test_make_ref_batch_refuses_an_object_array_unread(tmp_path, offline, capsys):
    marker = tmp_path / "ran"
    np.savez(tmp_path / "objects.npz", np.array([Marker(marker)] * 4, dtype=object))
    status, _, err = run_main(make_ref_batch, [tmp_path / "objects.npz", tmp_path / "out.npz"], capsys)
    assert status == 1 and "arr_0 is an array of Python objects" in error_line(err)
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


@pytest.mark.slow
def test_weights_without_batch_norm_counters_load_like_the_converted_file(tmp_path, weights, batches):
    # The released file (converted from TensorFlow) has no num_batches_tracked entries.
    full = torch.load(weights, weights_only=True)
    converted = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    assert len(converted) < len(full)
    torch.save(converted, tmp_path / "converted.pth")
    ref = np.load(batches["ref"])["arr_0"]
    want = inception.InceptionFeatures(weights, "cpu")(ref)
    got = inception.InceptionFeatures(tmp_path / "converted.pth", "cpu")(ref)
    for name in want._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


# ---------------------------------------------------------------- no silently wrong numbers


@pytest.mark.parametrize("name, bad", [("mu", np.nan), ("sigma", np.inf), ("mu_s", -np.inf), ("sigma_s", np.nan)])
def test_nan_or_inf_statistics_are_refused(tmp_path, batches, weights, capsys, name, bad):
    kind = "spatial" if name.endswith("_s") else "pool"
    mu_name, sigma_name, dim = npz_io.STATISTICS[kind]
    stats = {mu_name: np.zeros(dim, np.float32), sigma_name: np.eye(dim, dtype=np.float32)}
    stats[name].flat[dim + 1 if name.startswith("sigma") else 3] = bad
    np.savez(tmp_path / "stats.npz", arr_0=images(6, seed=1), **stats)
    status, out, err = run_main(evaluator, [tmp_path / "stats.npz", batches["sample"], "--inception_path", weights], capsys)
    assert status == 1 and out == ""
    assert f"stats.npz: {name} holds NaN or infinite values" in error_line(err)


@pytest.mark.parametrize("script", [evaluator, make_ref_batch])
def test_forged_image_count_is_refused_before_any_allocation(tmp_path, batches, weights, capsys, script):
    forged = forged_npz(tmp_path / "forged.npz", (10**15, 8, 8, 3), images(10, size=8).tobytes())
    second = batches["sample"] if script is evaluator else tmp_path / "out.npz"
    status, _, err = run_main(script, [forged, second, "--inception_path", weights], capsys)
    assert status == 1
    assert "forged.npz: arr_0's header declares shape (1000000000000000, 8, 8, 3)" in error_line(err)
    assert not (tmp_path / "out.npz").exists()


def test_negative_header_shape_is_refused(tmp_path, batches, capsys):
    forged = forged_npz(tmp_path / "forged.npz", (4, -8, -8, 3), images(4, size=8).tobytes())
    status, _, err = run_main(evaluator, [forged, batches["sample"]], capsys)
    assert status == 1 and "negative size" in error_line(err)


# ---------------------------------------------------------------- make_ref_batch never destroys a file


def test_make_ref_batch_refuses_a_folder_as_output(tmp_path, batches, offline, capsys):
    (tmp_path / "out").mkdir()
    status, _, err = run_main(make_ref_batch, [batches["ref"], tmp_path / "out"], capsys)
    assert status == 1 and f"{tmp_path / 'out'}: is a folder" in error_line(err)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("alias", ["same path", "symlink"])
def test_make_ref_batch_refuses_its_source_as_output(tmp_path, weights, capsys, alias):
    source = tmp_path / "data.npz"
    np.savez(source, images(8))
    before = source.read_bytes()
    output = source if alias == "same path" else tmp_path / "link.npz"
    if alias == "symlink":
        output.symlink_to(source)
    argv = [source, output, "--num_images", 4, "--image_size", 16, "--inception_path", weights]
    status, _, err = run_main(make_ref_batch, argv, capsys)
    assert status == 1 and f"is the input {source} itself" in error_line(err)
    assert source.read_bytes() == before


def test_evaluator_json_must_not_overwrite_an_input_or_be_a_folder(tmp_path, batches, offline, capsys):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(batches["ref"].read_bytes())
    for target, needle in [(ref, f"is the input {ref} itself"), (tmp_path, "is a folder")]:
        status, _, err = run_main(evaluator, [ref, batches["sample"], "--json", target], capsys)
        assert status == 1 and needle in error_line(err)
    assert ref.read_bytes() == batches["ref"].read_bytes()


def test_make_ref_batch_full_disk_keeps_the_old_output(tmp_path, batches, weights, monkeypatch, capsys):
    out = tmp_path / "ref.npz"
    out.write_bytes(b"an earlier reference batch")

    def disk_full(self, name, array):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(npz_io.NpzWriter, "write", disk_full)
    status, _, err = run_main(make_ref_batch, [batches["ref"], out, "--image_size", 16, "--inception_path", weights], capsys)
    assert status == 1
    assert f"{out}: cannot write (No space left on device); it is left as it was" in error_line(err)
    assert out.read_bytes() == b"an earlier reference batch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # the temporary file is gone


def test_make_ref_batch_ctrl_c_keeps_the_old_output(tmp_path, batches, weights, monkeypatch, capsys):
    out = tmp_path / "ref.npz"
    out.write_bytes(b"an earlier reference batch")

    def interrupt(self, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(inception.InceptionFeatures, "__call__", interrupt)
    status, _, err = run_main(make_ref_batch, [batches["ref"], out, "--image_size", 16, "--inception_path", weights], capsys)
    assert status == 130
    assert error_line(err) == f"error: interrupted; {out} was not written (any earlier file there is unchanged)"
    assert out.read_bytes() == b"an earlier reference batch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_evaluator_ctrl_c_is_one_line(tmp_path, batches, weights, monkeypatch, capsys):
    def interrupt(self, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(inception.InceptionFeatures, "__call__", interrupt)
    argv = [batches["ref"], batches["sample"], "--inception_path", weights, "--json", tmp_path / "r.json"]
    status, out, err = run_main(evaluator, argv, capsys)
    assert status == 130 and out == ""
    assert error_line(err) == "error: interrupted; no results were written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_evaluator_json_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, batches, weights, monkeypatch, capsys):
    results = tmp_path / "r.json"
    results.write_text("earlier results\n")

    def disk_full(self, text):
        self.write_bytes(text[:10].encode())  # some of it fits, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluator.Path, "write_text", disk_full)
    argv = [batches["ref"], batches["sample"], "--inception_path", weights, "--json", results]
    status, _, err = run_main(evaluator, argv, capsys)
    assert status == 1 and "r.json: cannot write (No space left on device)" in error_line(err)
    assert results.read_text() == "earlier results\n" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("script", [evaluator, make_ref_batch, digits_features])
def test_help_shows_every_default_and_the_examples_unmangled(script):
    parser = script.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in action.help, action.dest
    text = parser.format_help()
    examples = [line for line in script.__doc__.splitlines() if line.startswith("    python ")]
    assert examples and all(line in text for line in examples)
