"""The progress folder of an unfinished sampling run: an exclusive lock, the run's fingerprint, one file per saved batch.

`<output>.partial/` holds `lock` (locked by the run writing there; it holds its pid and host),
`run.json` (the run's fingerprint: resolved flags and checkpoint hashes, never the batch size)
and `from_<first index>.npz` per saved batch: arr_0 uint8 NHWC images, arr_1 int64 labels (when
labelled), index (each row's sample index) and stats (PixelAsParam statistics as JSON). Samples
are saved per index, so a run with another --batch_size continues the same progress, and an
index that two files hold is taken once.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import zipfile

import numpy as np

from .npz_io import InputError, atomic_npz, open_images

from .errors import UsageError
from .pixel_as_param import StepStats

_BATCH_NAME = re.compile(r"from_\d+\.npz")


class Progress:
    """An unfinished run's folder (rank 0 only): lock it, check or write its fingerprint, save and read batches."""

    def __init__(self, path, fingerprint):
        self.path, self.fingerprint = path, fingerprint
        self._lock_file = None
        self.files, self.stats, self.saved = [], StepStats(), None  # (name, index) per batch file; merged statistics

    def lock(self):
        """Make the folder and lock it for this process; raise UsageError naming the process that holds it."""
        lock_path = os.path.join(self.path, "lock")
        while self._lock_file is None:
            os.makedirs(self.path, exist_ok=True)
            f = open(lock_path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise UsageError(f"{self.path} is in use by another run ({holder}): wait for it to end, or stop it") from None
            if _same_file(f, lock_path):
                f.truncate(0)
                f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
                f.flush()
                self._lock_file = f
            else:  # the folder was removed by the run that held it just before we locked: start again
                f.close()

    def open(self, num_samples, image_shape, labelled):
        """A bool mask of the indices already saved; raises UsageError if the folder belongs to other settings.

        Every batch file is checked (readable, uint8 images of image_shape, labels when labelled,
        indices below num_samples) before anything is sampled.
        """
        self.num_samples, self.image_shape, self.labelled = num_samples, tuple(image_shape), labelled
        run_file = os.path.join(self.path, "run.json")
        for name in os.listdir(self.path):
            if name.startswith(".") or name.endswith(".tmp"):  # temporary files of a run killed while writing
                os.remove(os.path.join(self.path, name))
        batches = sorted(n for n in os.listdir(self.path) if _BATCH_NAME.fullmatch(n))
        if not os.path.exists(run_file):
            if batches:  # batches of unknown settings are never taken as this run's
                raise UsageError(f"{self.path} holds saved batches but no run.json saying which settings made them: delete the folder to sample from the start")
            write_json(run_file, self.fingerprint)
        previous = _read_json(run_file, f"delete the folder {self.path} to sample from the start")
        changed = differences(previous, self.fingerprint)
        if changed:
            raise UsageError(
                f"{self.path} holds an unfinished run with other flags ({', '.join(changed)}): "
                "run the same command to finish it, or delete that folder"
            )
        self.saved = np.zeros(num_samples, dtype=bool)
        for name in batches:
            index, stats = self._check_batch(name)
            self._add(name, index, stats)
        return self.saved

    def _check_batch(self, name):
        """(index, stats) of a saved batch file, or UsageError saying what is wrong with it and to delete it."""
        path = os.path.join(self.path, name)
        try:
            with open_images(path, min_images=1) as reader:
                shape = tuple(reader.shape)
            with np.load(path) as data:
                index, stats = data["index"], _stats_from_json(str(data["stats"]))
                labels = data["arr_1"] if "arr_1" in data.files else None
            problem = _batch_problem(index, shape, labels, self.num_samples, self.image_shape, self.labelled)
        except InputError as e:
            problem = str(e).replace(f"{path}: ", "")
        except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile) as e:  # zip, npy, JSON
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem:
            raise UsageError(f"saved batch {path} is unusable: {problem}; delete it to sample that batch again")
        return index, stats

    def _add(self, name, index, stats):
        """Count a batch file in: its new indices as saved, its statistics if it holds any new index."""
        if not self.saved[index].all():
            self.stats.merge(stats)
        self.saved[index] = True
        self.files.append((name, index))

    def save(self, result):
        """Save one batch atomically (a kill never leaves half a file); disk full is one line, keeping what was saved."""
        name = f"from_{result['index'][0]:09d}.npz"
        try:
            with atomic_npz(os.path.join(self.path, name)) as npz:
                npz.write("arr_0", result["images"])
                if result["labels"] is not None:
                    npz.write("arr_1", result["labels"])
                npz.write("index", result["index"])
                npz.write("stats", np.array(_stats_to_json(result["stats"])))
        except (InputError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise UsageError(
                f"cannot save a batch in {self.path} ({reason}): the {self.saved.sum()} samples saved there are kept; "
                "make room and run the same command again"
            ) from e
        self._add(name, result["index"], result["stats"])

    def owners(self):
        """(file number, row in that file) of every sample index, the first file holding an index taking it."""
        if not self.saved.all():
            raise UsageError(f"{self.path} lacks {np.count_nonzero(~self.saved)} samples: run the same command again")
        owner, row = np.full(self.num_samples, -1, dtype=np.int32), np.zeros(self.num_samples, dtype=np.int32)
        for number, (_, index) in enumerate(self.files):
            free = owner[index] < 0
            owner[index[free]], row[index[free]] = number, np.flatnonzero(free)
        return owner, row

    def chunks(self, member):
        """Array `member` of the saved batches (arr_0 images or arr_1 labels) in sample order, a run of rows at a time.

        Only one batch file is in memory at once.
        """
        owner, row = self.owners()
        starts = np.flatnonzero(np.diff(owner, prepend=-1))
        loaded_number, loaded = None, None
        for start, end in zip(starts, [*starts[1:], self.num_samples]):
            if owner[start] != loaded_number:
                loaded_number, loaded = owner[start], self._read(self.files[owner[start]][0], member)
            yield loaded[row[start:end]]

    def _read(self, name, member):
        """One array of a saved batch file (checked when the folder was opened)."""
        path = os.path.join(self.path, name)
        try:
            with np.load(path) as data:
                return data[member]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UsageError(f"saved batch {path} is unreadable ({e}): delete it to sample that batch again") from e

    def unlock(self):
        """Release the lock (the folder stays, for the same command to continue)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def remove(self):
        """Delete the folder (its run is finished), then release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()

    def remove_if_unused(self):
        """Delete the folder if no batch was saved in it (after a failure: no empty folder is left behind)."""
        if os.path.isdir(self.path) and not any(_BATCH_NAME.fullmatch(n) for n in os.listdir(self.path)):
            self.remove()
        self.unlock()


def _same_file(f, path):
    """Whether the open file f is still the one at path (not removed or replaced since it was opened)."""
    try:
        here, there = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _batch_problem(index, shape, labels, num_samples, image_shape, labelled):
    """What is wrong with a batch file's arrays ("" if nothing)."""
    if index.dtype != np.int64 or index.ndim != 1 or len(index) != shape[0]:
        return f"index is {index.dtype} {list(index.shape)}, expected int64 [{shape[0]}]"
    if len(index) and (index.min() < 0 or index.max() >= num_samples or len(np.unique(index)) != len(index)):
        return f"its indices are not distinct samples of 0..{num_samples - 1}"
    if shape[1:] != image_shape:
        return f"its images are {'x'.join(map(str, shape[1:]))}, this run makes {'x'.join(map(str, image_shape))}"
    if labelled and labels is None:
        return "it has no labels (arr_1)"
    if labelled and (labels.dtype != np.int64 or labels.shape != index.shape):
        return f"its labels are {labels.dtype} {list(labels.shape)}, expected int64 [{len(index)}]"
    return ""


def _stats_to_json(stats):
    """A StepStats as JSON of its sums and counts."""
    return json.dumps({"sums": {str(t): s for t, s in stats.sums.items()}, "counts": {str(t): c for t, c in stats.counts.items()}})


def _stats_from_json(text):
    """The StepStats that `_stats_to_json` wrote."""
    state, stats = json.loads(text), StepStats()
    stats.sums = {int(t): {k: float(v) for k, v in s.items()} for t, s in state["sums"].items()}
    stats.counts = {int(t): int(c) for t, c in state["counts"].items()}
    return stats


def write_json(path, content):
    """Write JSON atomically: to a temporary file of a unique name, then renamed to path."""
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(content, f, indent=1)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _read_json(path, fix):
    """A JSON file's content, or UsageError naming the file and the fix."""
    try:
        with open(path) as f:
            content = json.load(f)
        if not isinstance(content, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} ({e}): {fix}") from e
    return content


def differences(old, new):
    """`--name old (now new)` for each setting that differs between two fingerprints."""
    def shown(value):
        return value[:12] if isinstance(value, str) and len(value) == 64 else value  # a SHA-256, shortened

    return [f"{k} {shown(old.get(k, 'unset'))} (now {shown(new.get(k, 'unset'))})" for k in {**old, **new} if old.get(k, "unset") != new.get(k, "unset")]
