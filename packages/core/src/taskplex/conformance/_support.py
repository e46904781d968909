"""Helpers of the conformance suite: bounded waits, marker files, and the process table."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from taskplex.conformance import BOUND
from taskplex.conformance import _tasks as tasks
from taskplex.executor import Executor, TaskFuture
from taskplex.results import ResultsQueue
from taskplex.serverbase import ServerBase
from taskplex.task import Task, TaskStatus

T = TypeVar("T")

POLL = 0.01
GRACE = 1.0
"""Seconds to watch for something that must NOT happen (a marker file after work was stopped).

Work that was not stopped polls its release file every 10 ms, so it would show up well within this.
"""

# The standard library keeps these helper processes (and a pipe to each) for the life of the
# interpreter once any code uses multiprocessing; they are not workers of the server under test.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


# ---------------------------------------------------------------------------------------------------
# bounded waits
# ---------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Block until ``condition()`` holds; fail the test, saying ``what``, after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {bound} s for {what}")
        time.sleep(POLL)


def highest_seen(sample: Callable[[], int], duration: float = GRACE) -> int:
    """The highest value ``sample()`` returns while watched for ``duration`` seconds."""
    highest = sample()
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        time.sleep(POLL)
        highest = max(highest, sample())
    return highest


async def await_until(condition: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Like :func:`wait_until`, without blocking the event loop."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {bound} s for {what}")
        await asyncio.sleep(POLL)


async def bounded(awaitable: Awaitable[T], what: str, bound: float = BOUND) -> T:
    """Await ``awaitable``; fail the test, saying ``what``, if it takes more than ``bound`` s."""
    try:
        return await asyncio.wait_for(awaitable, bound)
    except TimeoutError:
        pytest.fail(f"{what} did not finish within {bound} s")


def bounded_call(call: Callable[[], T], what: str, bound: float = BOUND) -> T:
    """Run a blocking ``call`` in a helper thread; fail the test if it has not returned in time."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread below
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="taskplex-conformance-call", daemon=True)
    thread.start()
    thread.join(bound)
    if thread.is_alive():
        pytest.fail(f"{what} was still blocked after {bound} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run an async scenario in a fresh event loop, as a plain test function would."""
    try:
        return asyncio.run(bounded(scenario, "the test scenario", 3 * BOUND))
    except BaseExceptionGroup as group:
        # a failure inside `async with TaskGroup()` arrives wrapped; show the failure itself
        raise _first_leaf(group) from None


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def collect(results: ResultsQueue, count: int) -> list[Task]:
    """Take ``count`` finished tasks from ``results``; fail if fewer arrive within BOUND."""
    try:
        return await asyncio.wait_for(results.get_batch(count, count), BOUND)
    except TimeoutError:
        pytest.fail(f"{len(results)} of {count} expected task(s) were delivered within {BOUND} s")


@asynccontextmanager
async def serving(server: ServerBase, markers: Markers) -> AsyncIterator[ServerBase]:
    """Start ``server`` in a task group for the body of the block, then stop it (bounded)."""
    async with asyncio.TaskGroup() as task_group:
        await bounded(server.start(task_group), "server.start()")
        try:
            yield server
        finally:
            markers.release_all()
            await bounded(server.stop(), "server.stop()")


def assert_delivered_once(tasks_: list[Task], expected: list[Task]) -> None:
    """The delivered tasks are exactly ``expected``: none missing, none twice."""
    ids = [task.id for task in tasks_]
    assert len(ids) == len(set(ids)), f"a task was delivered twice: ids {sorted(ids)}"
    assert set(ids) == {task.id for task in expected}, (
        f"delivered ids {sorted(ids)} != submitted ids {sorted(t.id for t in expected)}"
    )


# ---------------------------------------------------------------------------------------------------
# marker files
# ---------------------------------------------------------------------------------------------------


class Markers:
    """Marker files in a directory of the test, written by the functions in ``_tasks``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / tasks.SLOTS).mkdir(parents=True)

    def args(self, name: str, hold: bool = False) -> tuple[str, str, bool]:
        """Arguments of :func:`~taskplex.conformance._tasks.touch_and_wait` for ``name``."""
        return (str(self.directory), name, hold)

    def task(self, name: str, *, hold: bool = False, **policy: Any) -> Task:
        """A Task that marks ``name`` started, waits for release if ``hold``, then marks it done."""
        return Task(tasks.touch_and_wait, self.args(name, hold), **policy)

    def path(self, name: str, stage: str) -> Path:
        return self.directory / f"{name}.{stage}"

    def has(self, name: str, stage: str) -> bool:
        return self.path(name, stage).exists()

    def release(self, name: str) -> None:
        self.path(name, "release").touch()

    def release_all(self) -> None:
        (self.directory / tasks.RELEASE_ALL).touch()

    def open_slots(self) -> None:
        (self.directory / tasks.OPEN_SLOTS).touch()

    def slots_held(self) -> int:
        return len(os.listdir(self.directory / tasks.SLOTS))

    def runs(self, name: str) -> int:
        """How many times a task function counted a run of ``name``."""
        return len(list(self.directory.glob(f"{name}.run*")))

    def wait(self, name: str, stage: str = "started") -> None:
        wait_until(lambda: self.has(name, stage), f"marker {name}.{stage}")

    async def until(self, name: str, stage: str = "started") -> None:
        await await_until(lambda: self.has(name, stage), f"marker {name}.{stage}")

    async def until_any(self, *names: str, stage: str = "started") -> None:
        await await_until(
            lambda: any(self.has(name, stage) for name in names), f"one of {names} to be {stage}"
        )

    def release_blockers(self, blockers: list[Any]) -> None:
        """Release the tasks made by :func:`occupy_every_slot` (or its Executor variant)."""
        for i in range(len(blockers)):
            self.release(f"blocker{i}")

    async def assert_never(self, *names: str, stage: str) -> None:
        """Watch for GRACE seconds that none of ``names`` reaches ``stage``."""
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline:
            reached = [name for name in names if self.has(name, stage)]
            assert not reached, f"{reached} reached {stage!r} but must not have"
            await asyncio.sleep(POLL)

    async def pid(self, name: str, run: int) -> int:
        """The pid written by run ``run`` of :func:`~taskplex.conformance._tasks.wait_to_be_killed`."""
        path = self.path(name, f"pid{run}")
        await await_until(path.exists, f"run {run} of {name} to report its pid")
        return int(path.read_text())


async def occupy_every_slot(
    server: ServerBase, markers: Markers, results: ResultsQueue | None = None
) -> list[Task]:
    """Submit held tasks ``blocker0``... until every slot the server hands out is taken.

    A backend may launch tasks ahead of a free worker (``in_flight_limit() > workers``); tasks
    submitted after these blockers are then truly queued. Returns once a blocker runs.
    """
    blockers = [
        await server.submit(markers.task(f"blocker{i}", hold=True, results_queue=results))
        for i in range(server.in_flight_limit())
    ]
    await await_until(
        lambda: all(blocker.status is TaskStatus.RUNNING for blocker in blockers),
        "every blocker to be handed to a worker",
    )
    await markers.until_any(*(f"blocker{i}" for i in range(len(blockers))))
    return blockers


def occupy_every_executor_slot(executor: Executor, markers: Markers) -> list[TaskFuture]:
    """:func:`occupy_every_slot` for an Executor."""
    futures = [
        executor.submit_task(markers.task(f"blocker{i}", hold=True))
        for i in range(executor.server.in_flight_limit())
    ]
    wait_until(
        lambda: all(future.running() for future in futures), "every blocker to be handed to a worker"
    )
    wait_until(
        lambda: any(markers.has(f"blocker{i}", "started") for i in range(len(futures))),
        "a blocker to start",
    )
    return futures


# ---------------------------------------------------------------------------------------------------
# the process table
# ---------------------------------------------------------------------------------------------------


def _interpreter_helper_fds() -> set[int]:
    """The pipes this process holds to the standard library's multiprocessing helpers."""
    fds = set()
    for module_name, holder, attribute in (
        ("multiprocessing.resource_tracker", "_resource_tracker", "_fd"),
        ("multiprocessing.forkserver", "_forkserver", "_forkserver_alive_fd"),
    ):
        module = sys.modules.get(module_name)
        fd = getattr(getattr(module, holder, None), attribute, None)
        if isinstance(fd, int):
            fds.add(fd)
    return fds


class ProcessTable:
    """What this process had running when created: child processes, threads, file descriptors."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._children = {child.pid for child in self._me.children(recursive=True)}
        self._threads = set(threading.enumerate())
        self._fds = self._fd_count()
        self._helper_fds = _interpreter_helper_fds()

    def _fd_count(self) -> int | None:
        return self._me.num_fds() if hasattr(self._me, "num_fds") else None

    def leftovers(self) -> list[str]:
        """Everything started since the snapshot that still exists, described."""
        psutil = self._psutil
        found = []
        for child in self._me.children(recursive=True):
            if child.pid in self._children:
                continue
            try:
                cmdline = " ".join(child.cmdline())
                status = child.status()
            except psutil.ZombieProcess:
                cmdline, status = "(exited, not reaped by its parent)", "zombie"
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                cmdline, status = "?", "?"
            if any(helper in cmdline for helper in _INTERPRETER_HELPERS):
                continue
            found.append(f"process {child.pid} ({status}): {cmdline[:200]}")
        found.extend(
            f"thread {thread.name!r}"
            for thread in threading.enumerate()
            if thread not in self._threads and thread.is_alive()
        )
        fds = self._fd_count()
        if fds is not None and self._fds is not None:
            extra = fds - self._fds - len(_interpreter_helper_fds() - self._helper_fds)
            if extra > 0:
                found.append(f"{extra} file descriptor(s) more than before")
        return found

    def assert_clean(self) -> None:
        """Wait (bounded) until nothing started since the snapshot is left; fail listing what is."""
        deadline = time.monotonic() + BOUND
        while True:
            gc.collect()  # file descriptors of unreachable objects are closed by their finalisers
            left = self.leftovers()
            if not left:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"left behind after the server stopped ({BOUND} s): {left}")
            time.sleep(5 * POLL)
