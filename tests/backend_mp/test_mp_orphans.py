"""Nothing a task started outlives the program that ran it, however that program ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from taskplex_mp.processes import START_METHODS

BOUND = 30.0

SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import mp_tasks, taskplex

# Ctrl-C raises KeyboardInterrupt as on a terminal, also when the tests run in a background job
# (a shell without job control starts those with SIGINT ignored, and Python keeps it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    executor = taskplex.Executor("mp", workers=1, start_method=sys.argv[1])
    executor.submit(mp_tasks.start_sleeper, sys.argv[2])
    while not os.path.exists(os.path.join(sys.argv[2], "sleeper.pid")):
        time.sleep(0.01)
    if sys.argv[3] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("ready", flush=True)
    with executor:
        time.sleep(60)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{what} (pid {pid}) outlived the program that started it")
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["sigkill", "two ctrl-c"])
@pytest.mark.parametrize("start_method", START_METHODS)
def test_what_a_task_started_dies_with_the_program(
    tmp_path: Path, start_method: str, ending: str
) -> None:
    script = tmp_path / "program.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    program = subprocess.Popen(
        [sys.executable, str(script), start_method, str(tmp_path), ending.split(maxsplit=1)[0]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if ending == "two ctrl-c":
            assert program.stdout is not None
            assert program.stdout.readline() == "ready\n"
            program.send_signal(signal.SIGINT)
            time.sleep(0.3)
            program.send_signal(signal.SIGINT)
        program.wait(BOUND)
    finally:
        program.kill()
        program.wait()
    sleeper = int((tmp_path / "sleeper.pid").read_text())
    wait_gone(sleeper, "the process the task started")
