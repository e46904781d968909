"""Workers that die, and work that is stopped: detection, retries, replacement, and the bystanders.

Every check goes through a side channel the backend does not control: marker files written by the
tasks (see mp_tasks.py), and the process table (psutil).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mp_tasks
import psutil
import pytest

import taskplex
from taskplex import Task, TaskCancelled, TaskStatus, TaskTimeout, WorkerLost

BOUND = 30.0

START_METHODS = ["forkserver", "spawn", "fork"]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {BOUND} s for {what}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


class Markers:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def args(self, name: str) -> tuple[str, str]:
        return (str(self.directory), name)

    def pid(self, name: str) -> int:
        path = self.directory / f"{name}.started"
        wait_for(path.exists, f"{name} to start")
        return int(path.read_text())

    def has(self, name: str, stage: str) -> bool:
        return (self.directory / f"{name}.{stage}").exists()

    def release(self, name: str) -> None:
        (self.directory / f"{name}.release").touch()

    def runs(self, name: str) -> int:
        return mp_tasks.runs(str(self.directory), name)

    def reset(self, name: str) -> None:
        (self.directory / f"{name}.started").unlink()


@pytest.fixture
def markers(tmp_path: Path) -> Markers:
    return Markers(tmp_path)


@pytest.fixture
def executor(request: pytest.FixtureRequest) -> Iterator[taskplex.Executor]:
    options = getattr(request, "param", {})
    with taskplex.Executor("mp", **{"workers": 2, **options}) as executor:
        yield executor


def handed_over(task: Task) -> bool:
    """Whether the server handed ``task`` to the backend."""
    return task.launched_at is not None


def warm_up(executor: taskplex.Executor) -> None:
    """Run short tasks until the server hands workers several tasks at once."""
    for _ in range(50):
        for future in [executor.submit(mp_tasks.pid) for _ in range(200)]:
            future.result(timeout=BOUND)
        if executor.server.launch_limit > executor.server.workers:
            return
    pytest.fail("the server never pipelined short tasks")


# ------------------------------------------------------------------------------- dying workers


@pytest.mark.parametrize("start_method", START_METHODS)
def test_killed_worker_is_retried_then_fails_naming_the_signal(
    start_method: str, markers: Markers
) -> None:
    with taskplex.Executor("mp", workers=2, start_method=start_method) as executor:
        sibling = executor.submit(mp_tasks.hold, *markers.args("sibling"))
        sibling_pid = markers.pid("sibling")
        victim = Task(mp_tasks.hold, markers.args("victim"), retries=1)
        future = executor.submit_task(victim)
        first = markers.pid("victim")
        markers.reset("victim")
        os.kill(first, signal.SIGKILL)
        second = markers.pid("victim")
        assert second != first, "the retry ran in the killed process"
        os.kill(second, signal.SIGKILL)
        error = future.exception(timeout=BOUND)
        assert isinstance(error, WorkerLost), repr(error)
        assert "SIGKILL" in str(error)
        assert victim.attempts == 2
        assert markers.runs("victim") == 2
        # the sibling on the other worker was not disturbed, and a replacement serves new tasks
        assert not gone(sibling_pid)
        markers.release("sibling")
        assert sibling.result(timeout=BOUND) == sibling_pid
        assert markers.runs("sibling") == 1
        after = executor.submit(mp_tasks.pid).result(timeout=BOUND)
        assert after not in (first, second)
    assert gone(first)
    assert gone(second)


@pytest.mark.parametrize(
    ("how", "said"), [("exit", "exited with code 3"), ("segfault", "SIGSEGV"), ("sigkill", "SIGKILL")]
)
def test_worker_death_says_how_the_process_ended(how: str, said: str) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        error = executor.submit(mp_tasks.die, how).exception(timeout=BOUND)
        assert isinstance(error, WorkerLost), repr(error)
        assert said in str(error), str(error)
        assert executor.submit(mp_tasks.shout, "next").result(timeout=BOUND) == "next"


def test_pipelined_tasks_of_a_killed_worker_run_once_elsewhere(markers: Markers) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        warm_up(executor)
        blocker = executor.submit(mp_tasks.hold, *markers.args("blocker"))
        held = [Task(mp_tasks.mark, markers.args(f"held{i}")) for i in range(5)]
        futures = [executor.submit_task(task) for task in held]
        wait_for(
            lambda: all(handed_over(task) for task in held), "the held tasks to be handed to the worker"
        )
        assert all(task.status is TaskStatus.QUEUED for task in held), "handed over is not running"
        os.kill(markers.pid("blocker"), signal.SIGKILL)
        assert isinstance(blocker.exception(timeout=BOUND), WorkerLost)
        assert [future.result(timeout=BOUND) for future in futures] == [f"held{i}" for i in range(5)]
    for i, task in enumerate(held):
        assert task.attempts == 1, "a bystander of a dead worker was counted an attempt"
        assert markers.runs(f"held{i}") == 1


def test_task_leaves_no_process_behind_when_its_worker_is_stopped(tmp_path: Path) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        task = Task(mp_tasks.start_grandchild, (str(tmp_path),))
        executor.submit_task(task)
        pid_file = tmp_path / "grandchild.pid"
        wait_for(pid_file.exists, "the task to start a process")
        grandchild = int(pid_file.read_text())
        assert task.cancel()
        wait_for(lambda: gone(grandchild), "the task's own child process to be stopped")


# ------------------------------------------------------------------------------- stopping work


@pytest.mark.parametrize("stop", ["cancel", "timeout"])
def test_stopped_task_kills_and_replaces_its_worker(stop: str, markers: Markers) -> None:
    with taskplex.Executor("mp", workers=2) as executor:
        other = executor.submit(mp_tasks.hold, *markers.args("other"))
        task = Task(mp_tasks.hold, markers.args("slow"), timeout=0.5 if stop == "timeout" else None)
        future = executor.submit_task(task)
        worker = markers.pid("slow")
        if stop == "cancel":
            assert task.cancel()
        expected = TaskCancelled if stop == "cancel" else TaskTimeout
        assert isinstance(future.exception(timeout=BOUND), expected)
        wait_for(lambda: gone(worker), "the worker running the stopped task to end")
        markers.release("slow")
        assert executor.submit(mp_tasks.pid).result(timeout=BOUND) != worker
        assert not markers.has("slow", "done")
        markers.release("other")
        assert other.result(timeout=BOUND) == markers.pid("other")
    assert markers.runs("slow") == 1


def test_pipelined_task_that_is_cancelled_never_runs(markers: Markers) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        warm_up(executor)
        worker = executor.submit(mp_tasks.pid).result(timeout=BOUND)
        blocker = executor.submit(mp_tasks.hold, *markers.args("blocker"))
        doomed = Task(mp_tasks.mark, markers.args("doomed"))
        doomed_future = executor.submit_task(doomed)
        after = executor.submit(mp_tasks.mark, *markers.args("after"))
        wait_for(lambda: handed_over(doomed), "the task to be handed to the worker")
        assert not doomed_future.running(), "a task held by a worker has not started"
        assert markers.pid("blocker") == worker
        assert doomed.cancel()
        markers.release("blocker")
        assert blocker.result(timeout=BOUND) == worker
        assert after.result(timeout=BOUND) == "after"
        wait_for(doomed_future.cancelled, "the future of the withdrawn task to be cancelled")
        assert executor.submit(mp_tasks.pid).result(timeout=BOUND) == worker, (
            "revoking a task that had not started should not have cost the worker its life"
        )
    assert markers.runs("doomed") == 0
    assert markers.runs("after") == 1


def test_timeout_counts_from_the_start_not_from_the_hand_over(markers: Markers) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        warm_up(executor)
        blocker = executor.submit(mp_tasks.hold, *markers.args("blocker"))
        queued = Task(mp_tasks.mark, markers.args("queued"), timeout=0.5)
        future = executor.submit_task(queued)
        markers.pid("blocker")
        time.sleep(1.0)  # longer than the queued task's timeout, while it waits its turn
        markers.release("blocker")
        blocker.result(timeout=BOUND)
        assert future.result(timeout=BOUND) == "queued"


def test_lost_fork_server_is_replaced(markers: Markers) -> None:
    def fork_servers() -> list[psutil.Process]:
        return [
            child
            for child in psutil.Process().children()
            if "taskplex_mp.forkserver" in " ".join(child.cmdline())
        ]

    with taskplex.Executor("mp", workers=2, start_method="forkserver") as executor:
        running = Task(mp_tasks.hold, markers.args("running"), retries=1)
        future = executor.submit_task(running)
        first_worker = markers.pid("running")
        markers.reset("running")
        [forkserver] = fork_servers()
        forkserver.kill()
        # its workers end with it; the task is retried on a worker of a new fork server
        second_worker = markers.pid("running")
        assert second_worker != first_worker
        markers.release("running")
        assert future.result(timeout=BOUND) == second_worker
        assert running.attempts == 2
        assert [server.pid for server in fork_servers()] != [forkserver.pid]
    assert gone(first_worker)
