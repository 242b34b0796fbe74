"""models/download.py against a local HTTP server with Range support: fresh, resumed and interrupted downloads."""

import importlib.util
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("download", ROOT / "models" / "download.py")
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)

BLOB = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
NAME = "64x64_classifier.pt"


class Server:
    """A 127.0.0.1 server of BLOB at /<name> that honours `Range: bytes=N-` unless told not to.

    `cut_after` makes it announce the full length but close the connection after that many bytes.
    """

    def __init__(self):
        self.ranges, self.sent, self.honour_range, self.cut_after = [], 0, True, None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                header = self.headers.get("Range")
                server.ranges.append(header)
                start = int(header[len("bytes=") : -1]) if header and server.honour_range else 0
                if start >= len(BLOB) and header:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(BLOB)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = BLOB[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                body = body[: server.cut_after] if server.cut_after is not None else body
                self.wfile.write(body)
                server.sent += len(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{name}}"
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _fetch(server, directory):
    return download.main([NAME, "--dir", str(directory), "--url", server.url])


def test_fresh_download(server, tmp_path):
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB
    assert not (tmp_path / f"{NAME}.part").exists()
    assert server.ranges == [None]
    assert _fetch(server, tmp_path) == 0  # already there: no second request
    assert server.ranges == [None]


def test_resumes_a_partial_file(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(BLOB[:100_000])
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB
    assert server.ranges == ["bytes=100000-"] and server.sent == len(BLOB) - 100_000


def test_interrupted_download_keeps_the_part_and_resumes(server, tmp_path, capsys):
    server.cut_after = 120_000
    assert _fetch(server, tmp_path) == 1
    assert not (tmp_path / NAME).exists()  # never renamed into place while incomplete
    assert (tmp_path / f"{NAME}.part").read_bytes() == BLOB[:120_000]
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("download.py: error: download of 64x64_classifier.pt") and error.endswith("run the same command again to resume")
    server.cut_after = None
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB
    assert server.ranges == [None, "bytes=120000-"]


def test_server_without_range_support_restarts(server, tmp_path):
    server.honour_range = False
    (tmp_path / f"{NAME}.part").write_bytes(b"stale bytes")
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB


def test_complete_part_is_renamed(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(BLOB)
    assert _fetch(server, tmp_path) == 0
    assert (tmp_path / NAME).read_bytes() == BLOB and server.ranges == [f"bytes={len(BLOB)}-"]


def test_unknown_name_lists_the_valid_ones(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "models" / "download.py"), "64x64_diffusion.pt", "nope.pt", "--dir", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unknown checkpoint(s) nope.pt; official ones: 64x64_diffusion.pt, 64x64_classifier.pt" in proc.stderr
    assert "lsun_horse_nodropout.pt" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing fetched before the names were checked
