"""Helpers of the conformance suite: bounded waits, marker files, and checking what is left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from taskplex import executor as _executor
from taskplex.conformance import BOUND
from taskplex.conformance import _tasks as tasks
from taskplex.conformance.provider import Leftovers, TestProvider, WorkerReport
from taskplex.executor import Executor, TaskFuture
from taskplex.results import ResultsQueue
from taskplex.scheduler import TaskServer
from taskplex.task import Task, TaskStatus

T = TypeVar("T")

POLL = 0.01
GRACE = 1.0
"""Seconds to watch for something that must NOT happen (a marker file after work was stopped).

Work that was not stopped polls its release file every 10 ms, so it would show up well within this
(times the backend's latency).
"""

_scale = [1.0]
"""The latency of the backend under test (set per test by the suite's fixture)."""


@contextlib.contextmanager
def latency(factor: float) -> Iterator[None]:
    """Multiply every bound of the suite by ``factor`` (the provider's latency) for a while."""
    previous = _scale[0]
    _scale[0] = factor
    try:
        yield
    finally:
        _scale[0] = previous


def bound() -> float:
    """Seconds the suite waits for anything, scaled to the backend under test."""
    return BOUND * _scale[0]


def grace() -> float:
    """Seconds the suite watches for something that must not happen, scaled likewise."""
    return GRACE * _scale[0]


# ---------------------------------------------------------------------------------------------------
# bounded waits
# ---------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, limit: float | None = None) -> None:
    """Block until ``condition()`` holds; fail the test, saying ``what``, after the bound."""
    limit = bound() if limit is None else limit
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {limit} s for {what}")
        time.sleep(POLL)


def highest_seen(sample: Callable[[], int], duration: float | None = None) -> int:
    """The highest value ``sample()`` returns while watched for ``duration`` seconds."""
    highest = sample()
    deadline = time.monotonic() + (grace() if duration is None else duration)
    while time.monotonic() < deadline:
        time.sleep(POLL)
        highest = max(highest, sample())
    return highest


async def await_until(condition: Callable[[], bool], what: str, limit: float | None = None) -> None:
    """Like :func:`wait_until`, without blocking the event loop."""
    limit = bound() if limit is None else limit
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {limit} s for {what}")
        await asyncio.sleep(POLL)


async def settle(condition: Callable[[], bool], limit: float) -> bool:
    """Wait up to ``limit`` seconds for ``condition``; whether it came (never fails the test)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL)
    return True


async def bounded(awaitable: Awaitable[T], what: str, limit: float | None = None) -> T:
    """Await ``awaitable``; fail the test, saying ``what``, if it takes longer than the bound."""
    limit = bound() if limit is None else limit
    try:
        return await asyncio.wait_for(awaitable, limit)
    except TimeoutError:
        pytest.fail(f"{what} did not finish within {limit} s")


def bounded_call(call: Callable[[], T], what: str, limit: float | None = None) -> T:
    """Run a blocking ``call`` in a helper thread; fail the test if it has not returned in time."""
    limit = bound() if limit is None else limit
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread below
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="taskplex-conformance-call", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"{what} was still blocked after {limit} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run an async scenario in a fresh event loop, as a plain test function would.

    The loop runs in a helper thread, and what the scenario leaves running is given a bounded time
    to end: a backend that hangs even its cleanup fails its test with the failure the scenario saw,
    and the run goes on without it.
    """
    limit = 3 * bound()

    def in_a_loop() -> T:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(bounded(scenario, "the test scenario", limit))
        except BaseExceptionGroup as group:
            # a failure inside `async with TaskGroup()` arrives wrapped; show the failure itself
            raise _first_leaf(group) from None
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=bound()))
            if not any(not task.done() for task in left):
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

    return bounded_call(in_a_loop, "the test scenario (with its cleanup)", limit + 2 * bound())


def abandon(executor: Executor) -> None:
    """Forget an Executor whose shutdown hung, so that the end of the run does not wait for it."""
    _executor._live_runners.discard(executor._runner)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def collect(results: ResultsQueue, count: int) -> list[Task]:
    """Take ``count`` finished tasks from ``results``; fail if fewer arrive within BOUND."""
    limit = bound()
    try:
        return await asyncio.wait_for(results.get_batch(count, count), limit)
    except TimeoutError:
        pytest.fail(f"{len(results)} of {count} expected task(s) were delivered within {limit} s")


@asynccontextmanager
async def serving(server: TaskServer, markers: Markers) -> AsyncIterator[TaskServer]:
    """Start ``server`` for the body of the block, then stop it (bounded).

    The server runs in a task group of its own, hosted by a separate task: if the backend hangs
    its stop, the test fails saying so instead of waiting on the task group forever.
    """
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def host() -> None:
        async with asyncio.TaskGroup() as task_group:
            try:
                await server.start(task_group)
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            await release.wait()

    hosting = asyncio.ensure_future(host())
    await bounded(asyncio.shield(started), "server.start()")
    try:
        yield server
    finally:
        markers.release_all()
        await bounded(server.stop(), "server.stop()")
        release.set()
        await bounded(hosting, "the server's task group to end after stop()")


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

    def __init__(self, directory: Path, provider: TestProvider | None = None) -> None:
        self.directory = directory
        self.provider = provider or TestProvider()
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

    def clear_slots(self, prefix: str) -> None:
        """Remove the slot files of tasks named ``prefix...`` (their work was killed)."""
        for path in (self.directory / tasks.SLOTS).glob(f"{prefix}*"):
            path.unlink(missing_ok=True)

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
        """Watch for a grace period that none of ``names`` reaches ``stage``."""
        deadline = time.monotonic() + grace()
        while time.monotonic() < deadline:
            reached = [name for name in names if self.has(name, stage)]
            assert not reached, f"{reached} reached {stage!r} but must not have"
            await asyncio.sleep(POLL)

    async def worker(self, name: str, run: int) -> WorkerReport:
        """Where run ``run`` of :func:`~taskplex.conformance._tasks.wait_to_be_killed` runs."""
        path = self.path(name, f"pid{run}")
        await await_until(path.exists, f"run {run} of {name} to report its pid")
        pid, host = path.read_text().split(" ", 1)
        return WorkerReport(int(pid), host)

    async def kill_worker(self, name: str, run: int) -> None:
        """Kill the worker running run ``run`` of ``name``, through the provider."""
        self.provider.kill_worker(await self.worker(name, run))


async def occupy_every_slot(
    server: TaskServer, markers: Markers, results: ResultsQueue | None = None
) -> list[Task]:
    """Submit held tasks ``blocker0``... until every slot the server hands out is taken.

    A backend may launch tasks ahead of a free worker (``launch_limit > workers``); tasks
    submitted after these blockers are then truly queued. Returns once a blocker runs.
    """
    blockers = [
        await server.submit(markers.task(f"blocker{i}", hold=True, results_queue=results))
        for i in range(server.launch_limit)
    ]
    await await_until(
        lambda: sum(blocker.status is TaskStatus.RUNNING for blocker in blockers) >= server.workers,
        "every worker to run a blocker",
    )
    await markers.until_any(*(f"blocker{i}" for i in range(len(blockers))))
    return blockers


async def warm_up(server: TaskServer, rounds: int = 5, batch: int = 64) -> None:
    """Run short tasks, so that a backend that tunes its prefetch to task durations prefetches.

    Stops early once the server launches ahead of its workers, or when a round is slow (such a
    backend would not prefetch short tasks anyway).
    """
    results = ResultsQueue()
    for _ in range(rounds):
        if server.launch_limit > server.workers:
            return
        started = time.monotonic()
        for i in range(batch):
            await server.submit(Task(tasks.echo, (i,), results_queue=results))
        await collect(results, batch)
        if time.monotonic() - started > grace():
            return


def occupy_every_executor_slot(executor: Executor, markers: Markers) -> list[TaskFuture]:
    """:func:`occupy_every_slot` for an Executor."""
    futures = [
        executor.submit_task(markers.task(f"blocker{i}", hold=True))
        for i in range(executor.server.launch_limit)
    ]
    wait_until(
        lambda: sum(future.running() for future in futures) >= executor.server.workers,
        "every worker to run a blocker",
    )
    wait_until(
        lambda: any(markers.has(f"blocker{i}", "started") for i in range(len(futures))),
        "a blocker to start",
    )
    return futures


# ---------------------------------------------------------------------------------------------------
# what is left behind
# ---------------------------------------------------------------------------------------------------


def assert_clean(leftovers: Leftovers) -> None:
    """Wait (bounded) until nothing the server started is left; fail listing what is."""
    deadline = time.monotonic() + bound()
    while True:
        left = leftovers.remaining()
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"left behind after the server stopped ({bound()} s): {left}")
        time.sleep(5 * POLL)
