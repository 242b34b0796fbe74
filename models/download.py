"""Fetch official checkpoints by name into this folder, verified, resuming partial downloads.

    python models/download.py 64x64_diffusion.pt 64x64_classifier.pt
    python models/download.py 256x256_diffusion.pt --dir /data/checkpoints

Files come from the OpenAI blob store unless --url names another address ({name} is replaced):
    https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}

Each file is written to `<name>.part` and installed under its name only once it has the length
the server announced, loads as plain tensors (torch.load with weights_only=True) and has exactly
the keys and shapes of that official checkpoint; its SHA-256 is then printed and written to
`<name>.sha256`. A failing file is never installed. After an interruption (exit status 1, or 130
for Ctrl-C) the same command continues where it stopped: HTTP Range with If-Range, so that a file
changed on the server since is fetched again from the start instead of being spliced. A second
download of the same file while one runs is refused (a lock beside the .part names its process).
"""

import argparse
import fcntl
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

from tqdm.auto import tqdm

from guided_diffusion.checkpoints import DOWNLOAD_URL, OFFICIAL, architecture, file_sha256, official_architectures
from guided_diffusion.dist_util import load_model_state_dict
from guided_diffusion.errors import UsageError

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed: the message says whether its .part was kept for the next try."""


class Interrupted(DownloadError):
    """Ctrl-C during a download; its .part is kept."""


def check_names(names):
    """Raise UsageError naming the valid checkpoints if any name is not an official one."""
    unknown = [name for name in names if name not in OFFICIAL]
    if unknown:
        raise UsageError(f"unknown checkpoint(s) {', '.join(unknown)}; official ones: {', '.join(OFFICIAL)}")


def check_url(url_template):
    """Raise UsageError unless url_template is an http(s) URL with a {name} placeholder."""
    try:
        url = url_template.format(name="x.pt")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--url {url_template!r} is not a template with only {{name}} in braces ({e})") from None
    parts = urllib.parse.urlsplit(url)
    if "{name}" not in url_template or parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(
            f"--url {url_template!r} must be an http:// or https:// address containing {{name}}, e.g. {DOWNLOAD_URL}"
        )


def prepare_dir(directory):
    """Create the download folder if needed; UsageError if it is a file or cannot be created or written."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"--dir {directory} is a file, not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--dir {directory}: cannot create it ({e.strerror})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--dir {directory}: not writable")


def official_manifest(name):
    """The (key, shape) set that the official checkpoint `name` has."""
    return official_architectures()[name]


def verify(path, manifest):
    """Raise DownloadError unless path loads as plain tensors (weights_only) with exactly the manifest's keys and shapes."""
    try:
        state_dict = load_model_state_dict(path, map_location="cpu")
    except UsageError as e:
        raise DownloadError(str(e)) from None
    found = frozenset(architecture(state_dict))
    if found != manifest:
        key, _ = sorted(found ^ manifest)[0]
        raise DownloadError(
            f"its keys and shapes are not the official ones ({len(found ^ manifest)} (key, shape) pairs differ, first {key})"
        )


def install(part, path):
    """Write the SHA-256 of a verified part to `<path>.sha256` and rename the part to path; returns the SHA-256."""
    sha256 = file_sha256(part)
    try:
        with open(f"{path}.sha256", "w") as f:
            f.write(f"{sha256}  {os.path.basename(path)}\n")
        os.replace(part, path)
        _discard(part)  # its resume record
    except OSError as e:
        raise DownloadError(
            f"cannot write {path}.sha256 or {path} ({e.strerror}); {part} is complete: run the same command again"
        ) from None
    return sha256


def download(name, directory, url_template=DOWNLOAD_URL, timeout=60):
    """Download, verify and install one official checkpoint into directory (verified only, if there); returns its path."""
    check_names([name])
    path = os.path.join(directory, name)
    part = f"{path}.part"
    with exclusive(part):
        if not os.path.exists(path):
            return _download_part(name, path, part, url_template, timeout)
        try:
            verify(path, official_manifest(name))
        except DownloadError as e:
            raise DownloadError(f"{path} is there but is not the official {name}: {e}; delete it and run again") from None
        print(f"{path} is already there (verified), sha256 {file_sha256(path)}")
        return path


@contextmanager
def exclusive(part):
    """Hold the lock `.<part>.lock` beside part (removed after), so two downloads of one checkpoint never write one .part."""
    lock_path = os.path.join(os.path.dirname(part), f".{os.path.basename(part)}.lock")
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UsageError(f"{part} is being downloaded by {holder}: wait for it to end") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            os.remove(lock_path)  # while still held: a later run makes a fresh one


def _download_part(name, path, part, url_template, timeout):
    """Fetch (or resume) part, verify it and install it as path; returns path."""
    try:
        total = fetch(url_template.format(name=name), part, timeout, name)
    except KeyboardInterrupt:
        size = os.path.getsize(part) if os.path.exists(part) else 0
        raise Interrupted(f"interrupted: {part} keeps {size} bytes; run the same command again to resume") from None
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise DownloadError(f"download of {name} stopped at {size} of {total} bytes: run the same command again to resume")
    try:
        if total is not None and size > total:
            raise DownloadError(f"it has {size} bytes, more than the {total} announced")
        verify(part, official_manifest(name))
    except DownloadError as e:
        _discard(part)
        raise DownloadError(f"download of {name} not installed: {e}; removed it (check --url)") from None
    sha256 = install(part, path)
    print(f"saved {path}, sha256 {sha256} (also in {path}.sha256)")
    return path


def fetch(url, part, timeout, name):
    """Fetch url into part, resuming it when its record says from where; returns the announced total size or None.

    The record `<part>.json` keeps the URL and the first response's ETag or Last-Modified; a resume
    sends it as If-Range, so a changed file comes back whole (200) and the part starts over.
    """
    record = _read_record(part)
    done = os.path.getsize(part) if os.path.exists(part) else 0
    resume = done > 0 and record.get("url") == url and bool(record.get("validator"))
    done = done if resume else 0
    headers = {"Range": f"bytes={done}-", "If-Range": record["validator"]} if resume else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 206:
                total = _resumed_total(response, done, part)
            else:  # the whole file: start over
                done = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
                _write_record(part, {"url": url, "validator": validator})
            _copy(response, part, done, total, name)
            return total
    except urllib.error.HTTPError as e:
        if e.code == 416 and resume and _full_size(e) == done:  # nothing left to fetch
            return done
        if e.code == 416:
            _discard(part)
            raise DownloadError(
                f"cannot resume {name}: the server has no bytes past {done}; removed {part}: "
                "run the same command again to start over"
            ) from None
        raise DownloadError(f"cannot download {name}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or repr(e)
        raise DownloadError(f"download of {name} interrupted ({reason}): run the same command again to resume") from None


def _resumed_total(response, done, part):
    """The total size of a 206 answer, after checking that it continues at byte `done`."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != done:
        _discard(part)
        raise DownloadError(
            f"the server resumed at the wrong place ({response.headers.get('Content-Range')!r} for byte {done}); "
            f"removed {part}: run the same command again to start over"
        )
    return None if match.group(2) == "*" else int(match.group(2))


def _copy(response, part, done, total, name):
    """Append the response body to the .part file (from byte `done`) with a progress bar.

    Each chunk is flushed as it arrives, so an interruption keeps every byte received, and a
    write error (a full disk) is told apart from a network error.
    """
    try:
        f = open(part, "ab" if done else "wb")
    except OSError as e:
        raise _write_error(part, e) from None
    with f, tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
        while chunk := response.read1(CHUNK):
            try:
                f.write(chunk)
                f.flush()
            except OSError as e:
                raise _write_error(part, e) from None
            bar.update(len(chunk))


def _write_error(part, error):
    """The DownloadError for a failed write to a .part file, which keeps what it holds."""
    kept = os.path.getsize(part) if os.path.exists(part) else 0
    return DownloadError(
        f"cannot write {part} ({error.strerror}); it keeps {kept} bytes: free space and run the same command again to resume"
    )


def _read_record(part):
    """The resume record of a .part file, or {} if it has none (or an unreadable one)."""
    try:
        with open(f"{part}.json") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(part, record):
    """Write the resume record of a .part file."""
    try:
        with open(f"{part}.json", "w") as f:
            json.dump(record, f)
    except OSError as e:
        raise DownloadError(f"cannot write {part}.json ({e.strerror})") from None


def _discard(part):
    """Remove a .part file and its resume record."""
    for leftover in (part, f"{part}.json"):
        if os.path.exists(leftover):
            os.remove(leftover)


def _full_size(error):
    """The file size from a 416 response's `Content-Range: bytes */SIZE`, or None."""
    match = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def build_parser():
    """The command-line flags, each with its default in its help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one or more of: {', '.join(OFFICIAL)}")
    parser.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)), help="where to save (default: %(default)s)")
    parser.add_argument("--url", default=DOWNLOAD_URL, help="http(s) URL template with {name} (default: the OpenAI blob store, as above)")
    return parser


def main(argv=None):
    """Download the named checkpoints; on failure one line and status 2 (bad flags), 1 (download) or 130 (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        check_names(args.names)
        check_url(args.url)
        prepare_dir(args.dir)
        for name in args.names:
            download(name, args.dir, args.url)
    except (UsageError, DownloadError) as e:
        print(f"download.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 130 if isinstance(e, Interrupted) else 1
    except KeyboardInterrupt:
        print("download.py: error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
