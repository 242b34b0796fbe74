"""Key-value and text logging to stdout, `log.txt`, `progress.csv` and `progress.json`.

The module-level API (`configure`, `logkv`, `logkv_mean`, `dumpkvs`, `log`, `get_dir`) is the
original's. Under MPI, `dumpkvs` averages the values of all ranks and only rank 0 writes.
"""

import csv
import datetime
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class HumanOutputFormat:
    """Writes key-value tables and text lines for people (stdout or log.txt)."""

    def __init__(self, file):
        self.own_file = isinstance(file, str)
        self.file = open(file, "a") if self.own_file else file

    def writekvs(self, kvs):
        rows = [(str(k)[:30], f"{v:<8.3g}" if isinstance(v, float) else str(v)[:30]) for k, v in sorted(kvs.items())]
        if not rows:
            return
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(map(str, seq)) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class JSONOutputFormat:
    """Appends one JSON object per dump."""

    def __init__(self, path):
        self.file = open(path, "a")

    def writekvs(self, kvs):
        self.file.write(json.dumps({k: float(v) if hasattr(v, "dtype") else v for k, v in kvs.items()}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat:
    """Writes one CSV row per dump, rewriting the header when new keys appear."""

    def __init__(self, path):
        self.path = path
        self.keys = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                self.keys = next(csv.reader(f), [])

    def writekvs(self, kvs):
        new_keys = [k for k in sorted(kvs) if k not in self.keys]
        if new_keys:
            rows = []
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.keys += new_keys
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.keys)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.keys).writerow({k: kvs.get(k, "") for k in self.keys})

    def close(self):
        pass


def make_output_format(fmt, directory, log_suffix=""):
    """An output for format name `stdout`, `log`, `json` or `csv`."""
    os.makedirs(directory, exist_ok=True)
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(directory, f"log{log_suffix}.txt"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(directory, f"progress{log_suffix}.json"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(directory, f"progress{log_suffix}.csv"))
    raise ValueError(f"unknown log format {fmt!r}: use stdout, log, json or csv")


class Logger:
    """Accumulates key-values between dumps and writes them to its outputs."""

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        count = self.name2cnt[key]
        self.name2val[key] = (self.name2val[key] * count + val) / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self):
        """Write the accumulated values (averaged over MPI ranks) and start afresh."""
        if self.comm is None or self.comm.size == 1:
            values = dict(self.name2val)
        else:
            values = mpi_weighted_mean(self.comm, {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()})
        if self.comm is None or self.comm.rank == 0:
            for fmt in self.output_formats:
                fmt.writekvs(values)
        self.name2val.clear()
        self.name2cnt.clear()
        return values

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, HumanOutputFormat):
                    fmt.writeseq(args)

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def mpi_weighted_mean(comm, local_name2valcount):
    """Average {name: (value, count)} over all ranks, weighting each rank's value by its count."""
    gathered = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    sums, counts = defaultdict(float), defaultdict(float)
    for name2valcount in gathered:
        for name, (val, count) in name2valcount.items():
            try:
                sums[name] += float(val) * count
                counts[name] += count
            except (TypeError, ValueError):
                pass  # non-numeric values are not averaged
    return {name: sums[name] / counts[name] for name in sums}


_current = None


def get_current():
    """The active logger, configured with defaults on first use."""
    if _current is None:
        configure()
    return _current


def default_dir():
    """$OPENAI_LOGDIR, else a fresh time-stamped folder name in the temporary directory."""
    return os.getenv("OPENAI_LOGDIR") or os.path.join(tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"))


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Log to `dir` (default: $OPENAI_LOGDIR, else a fresh temporary folder).

    Rank 0 writes stdout, log.txt and progress.csv (override with $OPENAI_LOG_FORMAT);
    other ranks write only a log file with their rank as suffix.
    """
    global _current
    dir = os.path.expanduser(dir or default_dir())
    os.makedirs(dir, exist_ok=True)
    rank = _mpi_rank()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        env = os.getenv("OPENAI_LOG_FORMAT" if rank == 0 else "OPENAI_LOG_FORMAT_MPI")
        format_strs = env.split(",") if env else (["stdout", "log", "csv"] if rank == 0 else ["log"])
    if _current is not None:
        _current.close()
    _current = Logger(dir, [make_output_format(f, dir, log_suffix) for f in filter(None, format_strs)], comm=comm)
    if format_strs:
        log(f"Logging to {dir}")


def _mpi_rank():
    """This process's MPI rank from the launcher's environment (no MPI import needed)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def logkv(key, val):
    """Log a value for this iteration (the last call before a dump wins)."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Log a value to be averaged with the others of this iteration."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """Log several key-values."""
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    """Write all key-values of this iteration."""
    return get_current().dumpkvs()


def getkvs():
    """The key-values logged since the last dump."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write a line to the console and log.txt."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Only write lines at this level or above."""
    get_current().level = level


def set_comm(comm):
    """Average dumped values over this MPI communicator."""
    get_current().comm = comm


def get_dir():
    """The logging directory."""
    return get_current().dir


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    """Add the time spent inside the block to the `wait_<scopename>` key."""
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val["wait_" + scopename] += time.time() - start
