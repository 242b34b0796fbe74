"""Key-value and text logging to stdout, `log.txt`, `progress.csv` and `progress.json`.

The API is upstream's (OpenAI baselines' logger): module functions act on `Logger.CURRENT`.
Under MPI, `dumpkvs` averages the values of all ranks and rank 0 writes them. Log files are
appended to, never truncated, so a resumed run keeps the log of the run before it.
"""

import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

from .errors import UsageError

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50


class KVWriter:
    """An output that writes dicts of key-values."""

    def writekvs(self, kvs):
        raise NotImplementedError


class SeqWriter:
    """An output that writes lines of text."""

    def writeseq(self, seq):
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """Key-value tables and text lines for people, on a stream (stdout) or appended to a file."""

    def __init__(self, filename_or_file):
        self.own_file = isinstance(filename_or_file, str)
        self.file = open(filename_or_file, "a") if self.own_file else filename_or_file

    def writekvs(self, kvs):
        rows = {}
        for key, val in kvs.items():
            rows[self._truncate(str(key))] = self._truncate("%-8.3g" % val if hasattr(val, "__float__") else str(val))
        if not rows:
            print("WARNING: tried to write empty key-value dict")
            return
        key_width = max(map(len, rows))
        val_width = max(map(len, rows.values()))
        dashes = "-" * (key_width + val_width + 7)
        lines = [dashes]
        lines += [f"| {k:<{key_width}} | {v:<{val_width}} |" for k, v in sorted(rows.items(), key=lambda kv: kv[0].lower())]
        lines.append(dashes)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    @staticmethod
    def _truncate(s, maxlen=30):
        return s[: maxlen - 3] + "..." if len(s) > maxlen else s

    def writeseq(self, seq):
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dump, appended to a file."""

    def __init__(self, filename):
        self.file = open(filename, "a")

    def writekvs(self, kvs):
        values = {k: float(v) if hasattr(v, "dtype") else v for k, v in sorted(kvs.items())}
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """One CSV row per dump, appended to a file; new keys extend the header and pad earlier rows."""

    def __init__(self, filename):
        self.file = open(filename, "a+")
        self.sep = ","
        self.file.seek(0)
        header = self.file.readline().rstrip("\n")
        self.keys = header.split(self.sep) if header else []

    def writekvs(self, kvs):
        extra_keys = sorted(kvs.keys() - set(self.keys))
        if extra_keys:
            self.keys.extend(extra_keys)
            self.file.seek(0)
            rows = self.file.readlines()[1:]
            self.file.truncate(0)
            self.file.write(self.sep.join(self.keys) + "\n")
            self.file.writelines(row.rstrip("\n") + self.sep * len(extra_keys) + "\n" for row in rows)
        self.file.write(self.sep.join("" if kvs.get(k) is None else str(kvs[k]) for k in self.keys) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class TensorBoardOutputFormat(KVWriter):
    """Key-values as TensorBoard scalars in `dir`, one step per dump (needs the tensorboard package)."""

    def __init__(self, dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("the tensorboard log format needs the tensorboard package: pip install tensorboard") from None
        os.makedirs(dir, exist_ok=True)
        self.dir = dir
        self.step = 1
        self.writer = SummaryWriter(dir)

    def writekvs(self, kvs):
        for key, val in kvs.items():
            self.writer.add_scalar(key, float(val), self.step)
        self.writer.flush()
        self.step += 1

    def close(self):
        if self.writer:
            self.writer.close()
            self.writer = None


def make_output_format(format, ev_dir, log_suffix=""):
    """An output for format name `stdout`, `log`, `json`, `csv` or `tensorboard`, writing in ev_dir."""
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "tensorboard":
        return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise UsageError(f"unknown log format {format!r}: use stdout, log, json, csv or tensorboard")


# ---------------------------------------------------------------- the API, on the current logger


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
    """Write all key-values of this iteration and return them."""
    return get_current().dumpkvs()


def getkvs():
    """The key-values logged since the last dump."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write the args, separated by spaces, to the console and log.txt."""
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
    get_current().set_level(level)


def set_comm(comm):
    """Average dumped values over this MPI communicator."""
    get_current().set_comm(comm)


def get_dir():
    """The logging directory."""
    return get_current().get_dir()


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


def profile(n):
    """Decorator: add the time spent in each call of the function to the `wait_<n>` key."""

    def decorator(func):
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorator


# ---------------------------------------------------------------- the logger


def get_current():
    """The active logger, configured with defaults on first use."""
    if Logger.CURRENT is None:
        configure()
        Logger.DEFAULT = Logger.CURRENT
    return Logger.CURRENT


class Logger:
    """Accumulates key-values between dumps and writes them, and text lines, to its outputs."""

    DEFAULT = None  # the logger configured on first use, which reset() returns to
    CURRENT = None  # the logger the module functions write to

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
        self.name2val[key] = self.name2val[key] * count / (count + 1) + val / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self):
        """Write the accumulated values (averaged over the communicator's ranks, by rank 0) and start afresh."""
        if self.comm is None or self.comm.size == 1:
            values = dict(self.name2val)
        else:
            values = mpi_weighted_mean(self.comm, {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()})
        if self.comm is None or self.comm.rank == 0:
            for fmt in self.output_formats:
                if isinstance(fmt, KVWriter):
                    fmt.writekvs(values)
        self.name2val.clear()
        self.name2cnt.clear()
        return values

    def log(self, *args, level=INFO):
        if self.level <= level:
            self._do_log(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()

    def _do_log(self, args):
        for fmt in self.output_formats:
            if isinstance(fmt, SeqWriter):
                fmt.writeseq(map(str, args))


def get_rank_without_mpi_import():
    """This process's MPI rank from the launcher's environment (importing mpi4py would start MPI)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def mpi_weighted_mean(comm, local_name2valcount):
    """Average {name: (value, count)} over all ranks, weighting each rank's value by its count.

    Rank 0 gets the means ({} on the other ranks); non-numeric values are left out with a warning.
    """
    gathered = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    sums, counts = defaultdict(float), defaultdict(float)
    for name2valcount in gathered:
        for name, (val, count) in name2valcount.items():
            try:
                val = float(val)
            except (TypeError, ValueError):
                warnings.warn(f"WARNING: tried to compute mean on non-float {name}={val}")
            else:
                sums[name] += val * count
                counts[name] += count
    return {name: sums[name] / counts[name] for name in sums}


def default_dir():
    """$OPENAI_LOGDIR, else a fresh time-stamped folder name in the temporary directory."""
    return os.getenv("OPENAI_LOGDIR") or os.path.join(tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"))


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Log to `dir` (default: $OPENAI_LOGDIR, else a fresh temporary folder), averaging over comm.

    Rank 0 writes $OPENAI_LOG_FORMAT (default stdout,log,csv); other ranks write
    $OPENAI_LOG_FORMAT_MPI (default log) with their rank as file suffix.
    """
    dir = os.path.expanduser(dir or default_dir())
    os.makedirs(dir, exist_ok=True)
    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs if f]
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def reset():
    """Close the current logger and return to the one configured on first use."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log to another configuration inside the block, then close it and restore the previous logger."""
    previous = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
