"""What the conformance suite does not cover: this backend's options, messages and process groups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import taskplex
from taskplex_subprocess.server import LABEL_VARIABLE

BOUND = 30.0


@pytest.fixture
def executor() -> Iterator[taskplex.Executor]:
    with taskplex.Executor("subprocess", workers=2, label="backend-tests") as ex:
        yield ex


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + BOUND
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs {BOUND} s later"
        time.sleep(0.01)


def environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def start_sleeper(pid_file: str, then_wait: bool) -> int:
    """Start a process that would run for a minute, note its pid, and return or wait."""
    sleeper = subprocess.Popen(["sleep", "60"])
    Path(pid_file).write_text(str(sleeper.pid))
    if then_wait:
        time.sleep(BOUND)
    return sleeper.pid


# ---------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------


def test_python_option_names_what_is_wrong(tmp_path: Path) -> None:
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    cases = {
        42: "must be a path or a command name",
        "": "non-empty",
        "no-such-python-anywhere": "no such command on PATH",
        str(tmp_path / "missing" / "python"): "no such file",
        str(tmp_path): "is a directory",
        str(not_executable): "is not executable",
    }
    for value, message in cases.items():
        with pytest.raises(taskplex.InvalidOption, match=message):
            taskplex.create_server("subprocess", python=value)


@pytest.mark.parametrize("label", ["", "a\0b", 7])
def test_label_option_is_checked(label: object) -> None:
    with pytest.raises(taskplex.InvalidOption, match="label"):
        taskplex.create_server("subprocess", label=label)


def test_an_interpreter_that_cannot_run_workers_refuses_to_start(tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    impostor.write_text("#!/bin/sh\necho 'no taskplex in here' >&2\nexit 1\n")
    impostor.chmod(0o755)
    with pytest.raises(taskplex.BackendUnavailable, match="no taskplex in here"):
        taskplex.Executor("subprocess", python=str(impostor))


def test_workers_carry_the_label(executor: taskplex.Executor) -> None:
    assert executor.submit(environment_variable, LABEL_VARIABLE).result(BOUND) == "backend-tests"


# ---------------------------------------------------------------------------------------------------
# how work ends
# ---------------------------------------------------------------------------------------------------


def test_a_worker_that_dies_says_how(executor: taskplex.Executor) -> None:
    exited = executor.submit_task(taskplex.Task(os._exit, (3,), retries=0))
    with pytest.raises(taskplex.WorkerLost, match="exited with code 3"):
        exited.result(BOUND)
    segfault = executor.submit_task(
        taskplex.Task(lambda: os.kill(os.getpid(), signal.SIGSEGV), retries=0)
    )
    with pytest.raises(taskplex.WorkerLost, match="was killed by SIGSEGV"):
        segfault.result(BOUND)


def test_processes_a_task_leaves_behind_end_with_its_worker(
    executor: taskplex.Executor, tmp_path: Path
) -> None:
    sleeper = executor.submit(start_sleeper, str(tmp_path / "returned"), False).result(BOUND)
    wait_until_gone(sleeper)


def test_cancelling_a_task_ends_the_processes_it_started(
    executor: taskplex.Executor, tmp_path: Path
) -> None:
    pid_file = tmp_path / "waiting"
    future = executor.submit(start_sleeper, str(pid_file), True)
    deadline = time.monotonic() + BOUND
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the task did not start its process"
        time.sleep(0.01)
    assert future.task.cancel() is True
    wait_until_gone(int(pid_file.read_text()))


def test_print_output_reaches_the_callers_stdout(
    executor: taskplex.Executor, capfd: pytest.CaptureFixture[str]
) -> None:
    executor.submit(print, "printed in a worker").result(BOUND)
    assert "printed in a worker" in capfd.readouterr().out


def test_workers_run_this_interpreter_by_default() -> None:
    with taskplex.Executor("subprocess") as ex:
        assert ex.submit(lambda: sys.executable).result(BOUND) == sys.executable
