"""The embedded mode under faults, with real processes killed for real."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import zmq_tasks
from conftest import BOUND, FAST, gone, python_path, wait_until

import taskplex
from taskplex import Task, WorkerLost


def worker_host_of(task_pid: int) -> psutil.Process:
    """The worker host above a task process (its ancestor running ``taskplex_zmq worker``)."""
    for parent in psutil.Process(task_pid).parents():
        if "taskplex_zmq" in parent.cmdline() and "worker" in parent.cmdline():
            return parent
    raise AssertionError(f"process {task_pid} does not run under a zmq worker host")


@pytest.mark.parametrize("retries", [0, 1])
def test_a_killed_worker_host_costs_one_attempt(tmp_path: Path, retries: int) -> None:
    directory = str(tmp_path)
    with taskplex.Executor("zmq", workers=1, **FAST) as executor:
        task = Task(zmq_tasks.hold, (directory, "t"), retries=retries)
        future = executor.submit_task(task)
        wait_until(lambda: zmq_tasks.runs(directory, "t"), "the task to start")
        first = zmq_tasks.runs(directory, "t")[0]
        host = worker_host_of(first)
        host.send_signal(signal.SIGKILL)
        wait_until(lambda: gone([first]), "the task process to end with its worker host")
        zmq_tasks.release(directory, "t")
        if retries == 0:
            assert isinstance(future.exception(timeout=BOUND), WorkerLost)
            assert task.attempts == 1
        else:
            second = future.result(timeout=BOUND)
            assert zmq_tasks.runs(directory, "t") == [first, second]
            assert worker_host_of(second).pid != host.pid, "a new worker host ran the retry"
            assert task.attempts == 2
        # the replacement serves what comes next
        assert executor.submit(zmq_tasks.noop, 7).result(timeout=BOUND) == 7


def test_a_killed_task_process_is_retried_on_the_same_host(tmp_path: Path) -> None:
    directory = str(tmp_path)
    with taskplex.Executor("zmq", workers=1, **FAST) as executor:
        task = Task(zmq_tasks.hold, (directory, "t"), retries=1)
        future = executor.submit_task(task)
        wait_until(lambda: zmq_tasks.runs(directory, "t"), "the task to start")
        first = zmq_tasks.runs(directory, "t")[0]
        host = worker_host_of(first)
        psutil.Process(first).kill()
        wait_until(lambda: len(zmq_tasks.runs(directory, "t")) == 2, "the retry to start")
        zmq_tasks.release(directory, "t")
        second = future.result(timeout=BOUND)
        assert second != first
        assert worker_host_of(second).pid == host.pid
        assert task.attempts == 2


def test_cancelling_a_running_task_ends_its_process(tmp_path: Path) -> None:
    directory = str(tmp_path)
    with taskplex.Executor("zmq", workers=1, **FAST) as executor:
        task = Task(zmq_tasks.hold, (directory, "t"))
        executor.submit_task(task)
        wait_until(lambda: zmq_tasks.runs(directory, "t"), "the task to start")
        assert task.cancel(), "a running task is stopped where the backend declares cancel_running"
        wait_until(lambda: gone(zmq_tasks.runs(directory, "t")), "the cancelled task's process to end")
        assert executor.submit(zmq_tasks.noop, 1).result(timeout=BOUND) == 1


CALLER = """
import os, sys, time, psutil, taskplex
sys.path[:0] = {path!r}
import zmq_tasks
executor = taskplex.Executor("zmq", workers=2)
futures = [executor.submit(zmq_tasks.hold, {directory!r}, f"t{{i}}") for i in range(2)]
while len(zmq_tasks.runs({directory!r}, "t0")) + len(zmq_tasks.runs({directory!r}, "t1")) < 2:
    time.sleep(0.01)
print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
time.sleep(600)
"""


def test_a_client_killed_with_sigkill_leaves_no_process(tmp_path: Path) -> None:
    script = CALLER.format(path=sys.path, directory=str(tmp_path))
    caller = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, env=python_path()
    )
    try:
        assert caller.stdout is not None
        pids = [int(pid) for pid in caller.stdout.readline().split()]
        assert len(pids) >= 4, f"broker, worker host and two task processes, got {pids}"
        caller.kill()
        caller.wait(BOUND)
        wait_until(lambda: gone(pids), f"processes {pids} to end after their client was killed")
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        assert caller.stdout is not None
        caller.stdout.close()


def test_a_cancel_that_returned_true_is_never_beaten_by_a_start(tmp_path: Path) -> None:
    """Tasks launched ahead wait at the worker host behind a blocker; each is cancelled and the
    blocker released at once, so that the cancel races the worker host's next start. A task whose
    cancel() returned True never runs; one whose cancel() said False (its worker host had it
    next) runs to its end. Several rounds: the race goes either way."""
    directory = str(tmp_path)
    with taskplex.Executor("zmq", workers=1, **FAST) as executor:
        for round_ in range(5):
            # short tasks: the server launches several ahead of the one worker
            for future in [executor.submit(zmq_tasks.nap, 0.002, i) for i in range(40)]:
                future.result(timeout=BOUND)
            blocker = executor.submit(zmq_tasks.hold, directory, f"blocker{round_}")
            wait_until(lambda r=round_: zmq_tasks.runs(directory, f"blocker{r}"), "the blocker to start")
            names = [f"r{round_}q{i}" for i in range(12)]
            queued = [executor.submit(zmq_tasks.hold, directory, name) for name in names]
            cancelled = [future.cancel() for future in queued]
            zmq_tasks.release(directory, f"blocker{round_}")
            for name in names:
                zmq_tasks.release(directory, name)
            blocker.result(timeout=BOUND)
            for name, future, was_cancelled in zip(names, queued, cancelled, strict=True):
                if was_cancelled:
                    assert future.cancelled()
                else:
                    assert future.result(timeout=BOUND) == zmq_tasks.runs(directory, name)[0]
            executor.submit(zmq_tasks.noop).result(timeout=BOUND)  # every straggler reported
            ran = [
                name
                for name, was_cancelled in zip(names, cancelled, strict=True)
                if was_cancelled and zmq_tasks.runs(directory, name)
            ]
            assert not ran, f"round {round_}: tasks whose cancel() returned True ran: {ran}"
            assert any(cancelled), "no task was launched ahead and withdrawn"
