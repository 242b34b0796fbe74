"""Run `python file.py args` commands without paying the torch import each time.

Most of a tiny script run is the ~2.5 s import of torch. `run` hands such a command to a server
process that has imported torch and numpy once; the server forks a child per command, which takes
the command's argv, environment, working folder and its own stdout/stderr and runs the file as
`__main__`. The child is a separate process with its own exit status; only the interpreter start-up
is shared. Other commands (mpiexec, shell scripts, `python -c`) run as plain subprocesses, and tests
that need a real start-up (the README's command, signals, MPI) use subprocess themselves.
"""

import atexit
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback

_idle_servers = []
_all_servers = []
_lock = threading.Lock()


def _execute(script, argv, env, cwd, stdout, stderr, timeout):
    """In the forked child: be `python script argv...` run in cwd with env, writing to the two files; returns the exit status."""
    signal.alarm(timeout)  # past the timeout SIGALRM ends the child
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):  # torch reads it at import, which the server has done already
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    for fd, path in ((0, os.devnull), (1, stdout), (2, stderr)):
        opened = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exit:  # as the interpreter reads sys.exit's argument
        status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        if not isinstance(exit.code, (int, type(None))):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def _serve():
    """The server: import torch once, then for each request line fork a child and answer with its exit status."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            os._exit(_execute(**json.loads(line)))
        _, wait_status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(wait_status), flush=True)


def _stop_servers():
    for server in _all_servers:
        server.stdin.close()
        server.wait()


def run(command, env=None, cwd=None, timeout=300):
    """subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout), warm when command is `python file ...`."""
    command = [str(c) for c in command]
    if len(command) < 2 or command[0] != sys.executable or command[1].startswith("-"):
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    with _lock:  # one server per concurrent caller
        if not _idle_servers:
            _all_servers.append(subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            _idle_servers.append(_all_servers[-1])
            if len(_all_servers) == 1:
                atexit.register(_stop_servers)
        server = _idle_servers.pop()
    cwd = os.path.abspath(cwd or os.getcwd())
    with tempfile.TemporaryDirectory() as d:
        stdout, stderr = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        for path in (stdout, stderr):
            open(path, "w").close()
        request = dict(script=os.path.join(cwd, command[1]), argv=command[2:], env=dict(os.environ if env is None else env), cwd=cwd,
                       stdout=stdout, stderr=stderr, timeout=int(timeout) + 1)
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        status = int(server.stdout.readline())
        with _lock:
            _idle_servers.append(server)
        if status == -signal.SIGALRM:
            raise subprocess.TimeoutExpired(command, timeout)
        with open(stdout) as out, open(stderr) as err:
            return subprocess.CompletedProcess(command, status, out.read(), err.read())


if __name__ == "__main__":
    _serve()
