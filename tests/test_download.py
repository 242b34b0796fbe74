"""models/download.py against a local HTTP server: fresh, resumed, interrupted, changed, forged and refused downloads."""

import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import ROOT
from guided_diffusion.checkpoints import architecture

spec = importlib.util.spec_from_file_location("download", ROOT / "models" / "download.py")
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)

NAME = "64x64_classifier.pt"
SCRIPT = ROOT / "models" / "download.py"


def checkpoint_bytes(seed, **shapes):
    """torch.save bytes of a small state dict of random tensors (about 300 KB by default)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"body.weight": (300, 250), "body.bias": (300,)}
    buffer = io.BytesIO()
    torch.save({key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}, buffer)
    return buffer.getvalue()


BLOB = checkpoint_bytes(0)
BLOB_V2 = checkpoint_bytes(1)  # the same keys and shapes, other values: a file changed on the server


class Marker:
    """Pickles to a call that creates a file: proof of whether a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Server:
    """A 127.0.0.1 server of `files` (name -> bytes) with an ETag and `Range`/`If-Range` support.

    Knobs: `honour_range`; `send_length` (Content-Length or not); `cut_after` (close after that many
    bytes of the body); `stall_after` (send that many bytes, then wait for `release`).
    """

    def __init__(self):
        self.files, self.etag = {NAME: BLOB}, '"v1"'
        self.requests, self.sent = [], 0
        self.honour_range, self.send_length, self.cut_after, self.stall_after = True, True, None, None
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.files.get(self.path.lstrip("/"))
                ranged, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                server.requests.append((ranged, if_range))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if ranged and server.honour_range and if_range in (None, server.etag):
                    start = int(ranged[len("bytes=") : -1])
                if start >= len(body) and ranged:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("ETag", server.etag)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                if server.send_length:
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                body = body[start:][: server.cut_after]
                if server.stall_after is not None:
                    self.wfile.write(body[: server.stall_after])
                    self.wfile.flush()
                    server.release.wait(60)
                    return
                self.wfile.write(body)
                server.sent += len(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{name}}"
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def tiny_manifest(monkeypatch):
    """The test files' keys and shapes stand in for the official manifest of NAME."""
    manifest = frozenset(architecture(torch.load(io.BytesIO(BLOB), weights_only=True)))
    monkeypatch.setattr(download, "official_manifest", lambda name: manifest)


def _fetch(server, directory, name=NAME):
    return download.main([name, "--dir", str(directory), "--url", server.url])


def _error_line(err):
    """The one error line of a failed run (progress bars may come before it), checked free of tracebacks."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("download.py: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def _write_part(directory, data, url=None):
    """A .part file, with the resume record a download from url writes (none if url is None)."""
    (directory / f"{NAME}.part").write_bytes(data)
    if url is not None:
        (directory / f"{NAME}.part.json").write_text(json.dumps({"url": url.format(name=NAME), "validator": '"v1"'}))


def test_fresh_download_is_verified_hashed_and_installed(server, tmp_path, tiny_manifest, capsys):
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB
    sha256 = hashlib.sha256(BLOB).hexdigest()
    assert (tmp_path / f"{NAME}.sha256").read_text() == f"{sha256}  {NAME}\n"
    assert sha256 in capsys.readouterr().out
    assert _leftovers(tmp_path) == [NAME, f"{NAME}.sha256"]
    assert server.requests == [(None, None)]
    assert _fetch(server, tmp_path) == 0  # already there: verified again, no second request
    assert server.requests == [(None, None)] and f"already there (verified), sha256 {sha256}" in capsys.readouterr().out


def test_interrupted_download_keeps_the_part_and_resumes_with_if_range(server, tmp_path, tiny_manifest, capsys):
    server.cut_after = 120_000
    assert _fetch(server, tmp_path) == 1
    assert not (tmp_path / NAME).exists()  # never renamed into place while incomplete
    assert (tmp_path / f"{NAME}.part").read_bytes() == BLOB[:120_000]
    error = _error_line(capsys.readouterr().err)
    assert error.startswith("download.py: error: download of 64x64_classifier.pt") and error.endswith("run the same command again to resume")
    server.cut_after = None
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB
    assert server.requests == [(None, None), ("bytes=120000-", '"v1"')]
    assert _leftovers(tmp_path) == [NAME, f"{NAME}.sha256"]


def test_file_changed_on_the_server_restarts_instead_of_splicing(server, tmp_path, tiny_manifest):
    server.cut_after = 120_000
    assert _fetch(server, tmp_path) == 1
    server.cut_after, server.files[NAME], server.etag = None, BLOB_V2, '"v2"'
    assert _fetch(server, tmp_path) == 0
    assert server.requests[-1] == ("bytes=120000-", '"v1"')  # If-Range did not match: the whole new file came
    assert (tmp_path / NAME).read_bytes() == BLOB_V2


@pytest.mark.parametrize("record", ["none", "other url"])
def test_part_of_unknown_origin_is_not_continued(server, tmp_path, tiny_manifest, record):
    _write_part(tmp_path, b"wrong bytes " * 10_000, url=None if record == "none" else "http://elsewhere/{name}")
    assert _fetch(server, tmp_path) == 0
    assert server.requests == [(None, None)]
    assert (tmp_path / NAME).read_bytes() == BLOB


def test_server_without_range_support_restarts(server, tmp_path, tiny_manifest):
    server.honour_range = False
    _write_part(tmp_path, BLOB[:1000] + b"stale bytes", url=server.url)
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB


def test_complete_part_is_verified_and_installed(server, tmp_path, tiny_manifest):
    _write_part(tmp_path, BLOB, url=server.url)
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB and server.requests == [(f"bytes={len(BLOB)}-", '"v1"')]


def test_stream_without_length_that_closes_early_is_not_installed(server, tmp_path, tiny_manifest, capsys):
    server.send_length, server.cut_after = False, 100_000
    assert _fetch(server, tmp_path) == 1
    error = _error_line(capsys.readouterr().err)
    assert "download of 64x64_classifier.pt not installed: cannot read checkpoint" in error
    assert _leftovers(tmp_path) == []  # nothing installed; a part of unknown length that fails cannot be resumed


def test_html_page_is_not_installed(server, tmp_path, tiny_manifest, capsys):
    server.files[NAME] = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    assert _fetch(server, tmp_path) == 1
    error = _error_line(capsys.readouterr().err)
    assert "not installed" in error and "weights_only" not in error
    assert _leftovers(tmp_path) == []


def test_pickle_with_code_is_refused_unrun(server, tmp_path, tiny_manifest, capsys):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"body.weight": Marker(marker)}, buffer)
    server.files[NAME] = buffer.getvalue()
    (tmp_path / "models").mkdir()
    assert _fetch(server, tmp_path / "models") == 1
    error = _error_line(capsys.readouterr().err)
    assert "not installed" in error and "refused" in error and "weights_only" not in error
    assert not marker.exists() and _leftovers(tmp_path / "models") == []


def test_wrong_keys_for_a_real_official_name_are_refused(server, tmp_path, capsys):
    buffer = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(3)}, buffer)  # the real manifest of 64x64_classifier.pt is checked
    server.files[NAME] = buffer.getvalue()
    assert _fetch(server, tmp_path) == 1
    assert "its keys and shapes are not the official ones" in _error_line(capsys.readouterr().err)
    assert _leftovers(tmp_path) == []


def test_file_already_there_that_is_not_the_checkpoint_is_reported(server, tmp_path, tiny_manifest, capsys):
    (tmp_path / NAME).write_bytes(BLOB[:300])
    assert _fetch(server, tmp_path) == 1
    assert "is there but is not the official 64x64_classifier.pt" in _error_line(capsys.readouterr().err)
    assert server.requests == []


@pytest.mark.parametrize(
    "url, needle",
    [
        ("ftp://127.0.0.1/{name}", "http:// or https://"),
        ("file:///etc/{name}", "http:// or https://"),
        ("127.0.0.1/{name}", "http:// or https://"),
        ("http://127.0.0.1/checkpoint.pt", "containing {name}"),
        ("http://127.0.0.1/{nme}", "only {name} in braces"),
    ],
)
def test_bad_url_is_one_line(tmp_path, url, needle, capsys):
    assert download.main([NAME, "--dir", str(tmp_path / "d"), "--url", url]) == 2
    assert needle in _error_line(capsys.readouterr().err)
    assert _leftovers(tmp_path) == []


def test_bad_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for directory, needle in [(tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot create it")]:
        assert download.main([NAME, "--dir", str(directory)]) == 2
        assert needle in _error_line(capsys.readouterr().err)
    assert _leftovers(tmp_path) == ["file"]


def _start_script(server, directory, max_file_size=None):
    """models/download.py in a child process; max_file_size makes larger writes fail as on a full disk."""
    limit = "" if max_file_size is None else f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_size}, {max_file_size})); "
    launcher = f"import resource, runpy, sys; {limit}sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.Popen(
        [sys.executable, "-c", launcher, str(SCRIPT), NAME, "--dir", str(directory), "--url", server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.mark.slow
def test_ctrl_c_keeps_the_part_and_says_how_to_resume(server, tmp_path, tiny_manifest):
    server.stall_after = 50_000
    proc = _start_script(server, tmp_path)
    part = tmp_path / f"{NAME}.part"
    deadline = time.time() + 120
    while not (part.exists() and part.stat().st_size >= 50_000) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    server.release.set()
    assert proc.returncode == 130, err
    assert _error_line(err) == f"download.py: error: interrupted: {part} keeps 50000 bytes; run the same command again to resume"
    assert part.read_bytes() == BLOB[:50_000]
    server.stall_after = None
    assert _fetch(server, tmp_path) == 0
    assert server.requests[-1] == ("bytes=50000-", '"v1"') and (tmp_path / NAME).read_bytes() == BLOB


@pytest.mark.slow
def test_full_disk_keeps_the_part_and_says_so(server, tmp_path, tiny_manifest):
    limit = 100_000
    proc = _start_script(server, tmp_path, max_file_size=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    error = _error_line(err)
    assert f"cannot write {tmp_path / NAME}.part" in error and "run the same command again to resume" in error
    kept = (tmp_path / f"{NAME}.part").read_bytes()
    assert 0 < len(kept) <= limit and kept == BLOB[: len(kept)] and not (tmp_path / NAME).exists()
    assert _fetch(server, tmp_path) == 0
    assert server.requests[-1] == (f"bytes={len(kept)}-", '"v1"') and (tmp_path / NAME).read_bytes() == BLOB


@pytest.mark.slow
def test_unknown_name_lists_the_valid_ones(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "64x64_diffusion.pt", "nope.pt", "--dir", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unknown checkpoint(s) nope.pt; official ones: 64x64_diffusion.pt, 64x64_classifier.pt" in proc.stderr
    assert "lsun_horse_nodropout.pt" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing fetched before the names were checked


def test_help_shows_every_default_and_the_examples_unmangled():
    parser = download.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in action.help, action.dest
    text = parser.format_help()
    assert f"    {download.DOWNLOAD_URL}\n" in text
    for line in download.__doc__.splitlines():
        if line.startswith("    python "):
            assert line in text


@pytest.mark.slow
def test_a_second_download_of_the_same_file_is_refused_while_the_first_runs(server, tmp_path, tiny_manifest, capsys):
    server.stall_after = 50_000
    first = _start_script(server, tmp_path)
    part = tmp_path / f"{NAME}.part"
    deadline = time.time() + 120
    while not (part.exists() and part.stat().st_size >= 50_000) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert _fetch(server, tmp_path) == 2
    assert f"{part} is being downloaded by pid {first.pid} on host" in _error_line(capsys.readouterr().err)
    assert part.read_bytes() == BLOB[:50_000]  # the second run wrote nothing
    server.release.set()  # the stalled server then ends the first run's stream early
    _, err = first.communicate(timeout=60)
    assert first.returncode == 1 and "stopped at 50000" in err, err
    server.stall_after = None
    assert _fetch(server, tmp_path) == 0  # the lock went with the first run: this one resumes
    assert (tmp_path / NAME).read_bytes() == BLOB and _leftovers(tmp_path) == [NAME, f"{NAME}.sha256"]
