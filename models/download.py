"""Fetch official checkpoints by name into this folder, resuming partial downloads.

    python models/download.py 64x64_diffusion.pt 64x64_classifier.pt [--dir models]

Each file is written to `<name>.part` and renamed into place only once complete; run the same
command again after an interruption and it continues where it stopped (HTTP Range).
"""

import argparse
import http.client
import os
import re
import sys
import urllib.error
import urllib.request

from tqdm.auto import tqdm

from guided_diffusion.checkpoints import DOWNLOAD_URL, OFFICIAL
from guided_diffusion.errors import UsageError

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed or stopped early; its .part file is kept for the next try."""


def check_names(names):
    """Raise UsageError naming the valid checkpoints if any name is not an official one."""
    unknown = [name for name in names if name not in OFFICIAL]
    if unknown:
        raise UsageError(f"unknown checkpoint(s) {', '.join(unknown)}; official ones: {', '.join(OFFICIAL)}")


def download(name, directory, url_template=DOWNLOAD_URL, timeout=60):
    """Download one official checkpoint into directory (skipped if already there); returns its path."""
    check_names([name])
    path = os.path.join(directory, name)
    if os.path.exists(path):
        print(f"{path} is already there")
        return path
    os.makedirs(directory, exist_ok=True)
    part = f"{path}.part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url_template.format(name=name), headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status != 206:  # the server sent the whole file
                done = 0
            total = done + int(response.headers["Content-Length"]) if response.headers["Content-Length"] else None
            _copy(response, part, done, total, name)
    except urllib.error.HTTPError as e:
        if e.code != 416 or _full_size(e) != done:  # 416 with the whole file already here: nothing left to fetch
            hint = f" (delete {part} to start over)" if e.code == 416 else ""
            raise DownloadError(f"cannot download {name}: HTTP {e.code} {e.reason}{hint}") from e
        total = done
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or repr(e)
        raise DownloadError(f"download of {name} interrupted ({reason}): run the same command again to resume") from e
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise DownloadError(f"download of {name} stopped at {size} of {total} bytes: run the same command again to resume")
    os.replace(part, path)
    print(f"saved {path}")
    return path


def _copy(response, part, done, total, name):
    """Append the response body to the .part file (from byte `done`) with a progress bar."""
    with open(part, "ab" if done else "wb") as f, tqdm(
        total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=name
    ) as bar:
        while chunk := response.read(CHUNK):
            f.write(chunk)
            bar.update(len(chunk))


def _full_size(error):
    """The file size from a 416 response's `Content-Range: bytes */SIZE`, or None."""
    match = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def main(argv=None):
    """Download the named checkpoints; on failure one line and status 2 (bad names) or 1 (download)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(OFFICIAL)}")
    parser.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)), help="where to save (default: this folder)")
    parser.add_argument("--url", default=DOWNLOAD_URL, help="URL template with {name} (default: the OpenAI blob store)")
    args = parser.parse_args(argv)
    try:
        check_names(args.names)
        for name in args.names:
            download(name, args.dir, args.url)
    except (UsageError, DownloadError) as e:
        print(f"download.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
