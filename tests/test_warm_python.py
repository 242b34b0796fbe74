"""tests/warm_python.py: a warm run of `python file args` gives what subprocess.run gives."""

import os
import subprocess
import sys

import pytest

import warm_python

PROGRAM = """
import os, sys
print(sys.argv[1:], os.getcwd(), os.environ.get("WARM_CHECK"), __name__, sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "fail":
    raise ValueError("boom")
sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
"""


@pytest.mark.parametrize("argument", ["0", "3", "fail", "a message"])
def test_a_warm_run_matches_a_subprocess(tmp_path, argument):
    (tmp_path / "program.py").write_text(PROGRAM)
    command, env = [sys.executable, "program.py", argument], dict(os.environ, WARM_CHECK="seen")
    warm = warm_python.run(command, env=env, cwd=tmp_path)
    cold = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout)
    assert warm.stderr.splitlines()[0] == cold.stderr.splitlines()[0] == "to stderr"
    assert warm.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1]  # the exception or sys.exit's message


def test_torch_threads_follow_the_environment_and_the_timeout_holds(tmp_path):
    (tmp_path / "threads.py").write_text("import torch, time, sys\nprint(torch.get_num_threads())\ntime.sleep(float(sys.argv[1]))\n")
    run = warm_python.run([sys.executable, "threads.py", "0"], env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert (run.returncode, run.stdout) == (0, "1\n")
    with pytest.raises(subprocess.TimeoutExpired):
        warm_python.run([sys.executable, "threads.py", "30"], cwd=tmp_path, timeout=1)
