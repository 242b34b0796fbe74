"""How every script runs: grouped flags with help, the MPI ranks, failures and Ctrl-C ending every rank in one line.

A failure on any rank ends every rank: bad input (UsageError) exits with status 2 and one line
from rank 0; anything else prints its traceback where it happened and exits with status 1.
Ranks meet in `collective` calls, whose waits poll, so Ctrl-C reaches a waiting rank as well
as a working one: every rank then exits with status 130, and rank 0 prints one line.
"""

import argparse
import os
import signal
import sys
import time
import traceback

import numpy as np
import torch as th
import torch.distributed as dist

from . import dist_util
from .errors import UsageError
from .flag_help import group_rank, lookup
from .script_util import str2bool

INTERRUPTED = 130  # the exit status of a process ended by SIGINT, as shells report it
_FAREWELL_SECONDS = 5  # how long an interrupted rank waits for the others to be interrupted too
_METAVARS = {str2bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what was kept and how to continue (printed by rank 0)."""


class _Failed(Exception):
    """A failure that every rank has learnt of, with the exit status it calls for."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def create_argparser(description, *default_dicts, context=None):
    """A parser with a `--name value` flag for every default (later dicts win), grouped and helped by flag_help.

    The description (a script's docstring) is shown as written, so its example commands stay intact.
    A flag whose default is None is unset unless given, and parses as an integer (e.g. --seed).
    """
    parser = argparse.ArgumentParser(
        description=description, usage="%(prog)s [--flag value ...]", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = {k: v for d in default_dicts for k, v in d.items()}
    entries = {name: lookup(name, context) or ("other", "") for name in defaults}
    titles = sorted({group for group, _ in entries.values()}, key=group_rank)
    groups = {title: parser.add_argument_group(title) for title in titles}
    for name, default in defaults.items():
        group, text = entries[name]
        kind = str2bool if isinstance(default, bool) else int if default is None else type(default)
        shown = '""' if default == "" else "none" if default is None else default
        groups[group].add_argument(
            f"--{name}", default=default, type=kind, metavar=_METAVARS.get(kind, "VALUE"), help=f"{text} (default: {shown})".replace("%", "%%")
        )
    return parser


def run_script(main):
    """Run a script's main() on every MPI rank and exit: 0, or 2 (bad input), 1 (a bug), 130 (Ctrl-C)."""
    signal.signal(signal.SIGINT, _interrupt)
    dist_util.setup_dist()
    if dist.get_world_size() > 1 and not th.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        th.set_num_threads(max(1, len(os.sched_getaffinity(0)) // dist.get_world_size()))  # ranks share the cores
    status = 0
    try:
        try:
            main()
        except _Failed:
            raise
        except Exception as e:  # outside a collective: the other ranks wait in one, or fail here too
            _agree(_failure(e))
    except _Failed as e:
        status = e.status
        _say(f"error: {e}")
    except KeyboardInterrupt as e:
        status = INTERRUPTED
        _say(f"interrupted: {e}" if str(e) else "interrupted")
        if not _farewell():  # another rank is stuck where no signal reaches it: leave without MPI's goodbye
            _clean_up(status)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    finally:
        _clean_up(status)
        dist.destroy_process_group()
    sys.exit(status)


_cleanups = []


def on_failure(fn):
    """Have rank 0 call fn() if the script fails or is interrupted (e.g. to remove a folder it made and left empty)."""
    _cleanups.append(fn)


def _clean_up(status):
    """Run the on_failure calls once, on rank 0, if status says the script did not succeed."""
    while status and _cleanups and dist.get_rank() == 0:
        _cleanups.pop()()


def _interrupt(signum, frame):
    """SIGINT: raise KeyboardInterrupt once (a second Ctrl-C, or mpiexec passing the first on, is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _say(line):
    """Print `<script>: line` on stderr from rank 0."""
    if dist.get_rank() == 0:
        print(f"{os.path.basename(sys.argv[0])}: {line}", file=sys.stderr, flush=True)


def _failure(e):
    """(exit status, one-line message) for an exception on this rank; a bug's traceback is printed here."""
    if isinstance(e, UsageError):
        return 2, str(e)
    traceback.print_exc()
    return 1, f"{type(e).__name__}: {e}"


def collective(fn, broadcast=False):
    """fn() on every rank, then a failure on any rank is raised on all.

    Python objects travel over MPI, as in ADM: torch.distributed's object collectives leave
    tensors in gloo's threads that can abort the interpreter when it exits right after.

    Returns rank 0's value on every rank when broadcast, else every rank's value on rank 0 (None elsewhere).
    """
    try:
        value, failure = fn(), None
    except Exception as e:  # every rank must learn of it, or the others would wait forever
        value, failure = None, _failure(e)
    _agree(failure)
    comm = dist_util.mpi_comm()
    if broadcast:
        return comm.bcast(value, root=0) if comm else value
    return comm.gather(value, root=0) if comm else [value]


def _agree(failure):
    """Share this rank's failure (or None) with all ranks; raise _Failed on every rank if any failed."""
    comm = dist_util.mpi_comm()
    if _meet(interrupted=False):
        raise KeyboardInterrupt  # another rank was interrupted
    failures = comm.allgather(failure) if comm else [failure]
    for rank, found in enumerate(failures):
        if found:
            status, message = found
            raise _Failed(status, message if rank == 0 else f"(rank {rank}) {message}")


_pending = None  # this rank's meeting that has not completed yet: (request, buffers)
_met_interrupted = False  # a meeting has shown that some rank was interrupted (it served as the farewell)


def _meet(interrupted, timeout=None):
    """Wait until every rank arrives (polling, so a signal gets through); returns whether any rank came interrupted.

    With a timeout, returns None if the others did not all arrive in time.
    """
    global _pending, _met_interrupted
    comm = dist_util.mpi_comm()
    if comm is None or comm.size == 1:
        return interrupted
    if _pending is None:
        from mpi4py import MPI

        send, received = np.array([int(interrupted)]), np.zeros(1, dtype=int)
        _pending = (comm.Iallreduce(send, received, op=MPI.SUM), send, received)
    request, _, received = _pending
    deadline = None if timeout is None else time.monotonic() + timeout
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    _pending = None
    _met_interrupted = bool(received[0])
    return _met_interrupted


def _farewell():
    """After Ctrl-C: meet the other ranks (interrupted too) so that MPI can end cleanly; False if they never came."""
    if _met_interrupted:
        return True
    try:
        return _meet(interrupted=True, timeout=_FAREWELL_SECONDS) is not None
    except KeyboardInterrupt:
        return False
