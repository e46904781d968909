"""The Runner: a backend driven without a scheduler, by a program that schedules by itself.

Exercised on the real mp backend (task processes, killed and aborted for real, checked from the
process table) and the async backend, and on small backends defined here for what a real one
does not do on demand: fail in a background loop, or report while it launches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from taskplex import (
    BackendError,
    Capabilities,
    SerializationError,
    ServerNotRunning,
    Task,
    TaskCancelled,
    WorkerLost,
)
from taskplex.backend import Attempt, Backend, BackendContext, Runner
from taskplex_async import AsyncBackend
from taskplex_mp import MultiprocessingBackend

BOUND = 30.0
"""Seconds a test waits for something that should happen, so that it fails instead of hanging."""

T = TypeVar("T")


# ------------------------------------------------------------------------------ what tasks do


def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise ValueError(message)


def sleep_after_writing_pid(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(BOUND)


def touch(path: str) -> None:
    Path(path).write_text("ran")


async def sleep_forever(cancelled: list[bool]) -> None:
    try:
        await asyncio.sleep(BOUND)
    except asyncio.CancelledError:
        cancelled.append(True)
        raise


# ------------------------------------------------------------------------------ helpers


class Reports:
    """What a Runner told its caller, in order: (kind, attempt, detail)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Attempt, Any]] = []
        self._changed: asyncio.Event | None = None

    def runner(self, backend: Backend, *, workers: int = 1) -> Runner:
        return Runner(
            backend,
            workers=workers,
            on_started=lambda attempt, worker: self._note("started", attempt, worker),
            on_over=lambda attempt, result, error, worker: self._note("over", attempt, (result, error)),
            on_given_back=lambda attempt: self._note("given back", attempt, None),
        )

    def _note(self, kind: str, attempt: Attempt, detail: Any) -> None:
        self.events.append((kind, attempt, detail))
        if self._changed is not None:
            self._changed.set()

    def of(self, attempt: Attempt) -> list[str]:
        return [kind for kind, reported, _ in self.events if reported is attempt]

    def outcome(self, attempt: Attempt) -> tuple[Any, BaseException | None]:
        (detail,) = [
            detail for kind, reported, detail in self.events if reported is attempt and kind == "over"
        ]
        return detail

    def ended(self, *attempts: Attempt) -> bool:
        return all({"over", "given back"} & set(self.of(attempt)) for attempt in attempts)

    async def pid_in(self, path: Path) -> int:
        """The pid a task wrote to ``path``, once it did."""
        await self.until(lambda: path.exists() and path.read_text() != "")
        return int(path.read_text())

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds: checked on every report, and every 10 ms."""
        deadline = time.monotonic() + BOUND
        while not condition():
            assert time.monotonic() < deadline, "condition not reached in time"
            self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.01)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), 2 * BOUND))


def descendants() -> set[int]:
    """The processes below this one that have not ended."""
    alive = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


# ------------------------------------------------------------------------------ the mp backend


def test_a_runner_runs_tasks_on_the_mp_backend_and_reports_their_outcomes() -> None:
    reports = Reports()

    async def scenario() -> None:
        runner = reports.runner(MultiprocessingBackend(), workers=2)
        await runner.start()
        try:
            good, bad = runner.launch_many([Task(square, (7,)), Task(fail, ("no good",))])
            await reports.until(lambda: reports.ended(good, bad))
            assert reports.of(good) == ["started", "over"]
            assert reports.outcome(good) == (49, None)
            result, error = reports.outcome(bad)
            assert result is None
            assert type(error) is ValueError
            assert str(error) == "no good"
            assert error.__cause__ is not None  # the remote traceback
            assert runner.live == 0
        finally:
            await runner.stop()

    run(scenario)


def test_a_killed_task_process_is_reported_as_worker_lost_and_the_runner_goes_on(
    tmp_path: Path,
) -> None:
    reports = Reports()
    pid_file = tmp_path / "pid"

    async def scenario() -> None:
        runner = reports.runner(MultiprocessingBackend())
        await runner.start()
        try:
            doomed = runner.launch(Task(sleep_after_writing_pid, (str(pid_file),)))
            os.kill(await reports.pid_in(pid_file), signal.SIGKILL)
            await reports.until(lambda: reports.ended(doomed))
            assert reports.of(doomed) == ["started", "over"]
            _, error = reports.outcome(doomed)
            assert isinstance(error, WorkerLost)
            after = runner.launch(Task(square, (3,)))
            await reports.until(lambda: reports.ended(after))
            assert reports.outcome(after) == (9, None)
        finally:
            await runner.stop()

    run(scenario)


def test_abort_stops_a_running_attempt_and_withdraws_one_that_has_not_started(
    tmp_path: Path,
) -> None:
    reports = Reports()
    pid_file, marker = tmp_path / "pid", tmp_path / "marker"

    async def scenario() -> None:
        runner = reports.runner(MultiprocessingBackend())  # one process: the second task waits
        await runner.start()
        try:
            running = runner.launch(Task(sleep_after_writing_pid, (str(pid_file),)))
            waiting = runner.launch(Task(touch, (str(marker),)))
            pid = await reports.pid_in(pid_file)
            runner.abort(waiting)
            runner.abort(running)
            runner.abort(running)  # again: nothing more happens
            await reports.until(lambda: reports.ended(running, waiting))
            assert reports.of(waiting) == ["given back"]
            assert reports.of(running) == ["started", "over"]
            _, error = reports.outcome(running)
            assert isinstance(error, TaskCancelled)
            await reports.until(lambda: not psutil.pid_exists(pid) or pid not in descendants())
            # the process that replaced the killed one runs new work
            after = runner.launch(Task(square, (5,)))
            await reports.until(lambda: reports.ended(after))
            assert reports.outcome(after) == (25, None)
        finally:
            await runner.stop()
        assert not marker.exists(), "a withdrawn attempt ran"

    run(scenario)


def test_stop_ends_every_live_attempt_and_leaves_no_process_behind(tmp_path: Path) -> None:
    reports = Reports()
    pid_file, marker = tmp_path / "pid", tmp_path / "marker"
    before = descendants()

    async def scenario() -> None:
        runner = reports.runner(MultiprocessingBackend())
        await runner.start()
        assert descendants() - before, "the mp backend started no process"
        running = runner.launch(Task(sleep_after_writing_pid, (str(pid_file),)))
        waiting = runner.launch(Task(touch, (str(marker),)))
        await reports.pid_in(pid_file)
        await runner.stop()
        assert reports.ended(running, waiting)
        assert reports.of(waiting) == ["given back"]
        assert reports.of(running)[-1] == "over"
        assert runner.live == 0
        await runner.stop()  # again: nothing happens
        with pytest.raises(ServerNotRunning):
            runner.launch(Task(square, (1,)))
        await reports.until(lambda: not descendants() - before)

    run(scenario)
    assert not marker.exists(), "a withdrawn attempt ran"


def test_launch_refuses_a_task_the_backend_cannot_prepare_and_launches_none_of_its_batch() -> None:
    reports = Reports()

    async def scenario() -> None:
        runner = reports.runner(MultiprocessingBackend())
        with pytest.raises(ServerNotRunning):
            runner.launch(Task(square, (1,)))
        await runner.start()
        try:
            with pytest.raises(SerializationError):
                runner.launch_many([Task(square, (1,)), Task(square, (_Unpicklable(),))])
            assert runner.live == 0
            after = runner.launch(Task(square, (4,)))
            await reports.until(lambda: reports.ended(after))
        finally:
            await runner.stop()
        assert [kind for kind, _, _ in reports.events] == ["started", "over"]

    run(scenario)


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("not today")


# ------------------------------------------------------------------------------ the async backend


def test_a_runner_drives_the_async_backend() -> None:
    reports = Reports()
    cancelled: list[bool] = []

    async def double(x: int) -> int:
        return 2 * x

    async def scenario() -> None:
        runner = reports.runner(AsyncBackend(), workers=4)
        await runner.start()
        try:
            coroutine, function, endless = runner.launch_many(
                [Task(double, (21,)), Task(fail, ("in a thread",)), Task(sleep_forever, (cancelled,))]
            )
            await reports.until(lambda: reports.ended(coroutine, function) and bool(reports.of(endless)))
            assert reports.outcome(coroutine) == (42, None)
            _, error = reports.outcome(function)
            assert type(error) is ValueError
            assert str(error) == "in a thread"
            assert reports.of(endless) == ["started"]
            runner.abort(endless)
            await reports.until(lambda: reports.ended(endless))
            _, error = reports.outcome(endless)
            assert isinstance(error, TaskCancelled)
            assert cancelled == [True], "the coroutine was not cancelled"
        finally:
            await runner.stop()

    run(scenario)


# ------------------------------------------------------------------------------ backend failures


class HoldingBackend(Backend):
    """Starts every attempt at launch and ends none; a background loop fails when told to."""

    capabilities = Capabilities(cancel_running=True)

    def __init__(self, how: str) -> None:
        self.how = how
        self.launched: list[Attempt] = []
        self.stopped = False
        self.trouble: asyncio.Event | None = None
        self.context: BackendContext | None = None

    async def start(self, context: BackendContext) -> None:
        self.context = context
        self.trouble = asyncio.Event()
        context.spawn(self._watch(), name="watch the scheduler")

    async def _watch(self) -> None:
        assert self.trouble is not None
        assert self.context is not None
        await self.trouble.wait()
        if self.how == "raises":
            raise RuntimeError("the scheduler went away")
        self.context.fail(RuntimeError("the scheduler went away"))
        await asyncio.sleep(BOUND)

    async def stop(self) -> None:
        self.stopped = True

    def launch(self, attempts: Sequence[Attempt]) -> None:
        for attempt in attempts:
            self.launched.append(attempt)
            attempt.started()

    def abort(self, attempt: Attempt) -> None:
        pass  # as a backend that lost its scheduler: nothing to tell it


@pytest.mark.parametrize("how", ["raises", "fails"])
def test_a_failing_backend_loop_fails_every_live_attempt_and_later_launches(how: str) -> None:
    reports = Reports()
    backend = HoldingBackend(how)

    async def scenario() -> None:
        runner = reports.runner(backend, workers=2)
        await runner.start()
        try:
            first, second = runner.launch_many([Task(square, (1,)), Task(square, (2,))])
            await reports.until(lambda: len(reports.events) == 2)
            assert backend.trouble is not None
            backend.trouble.set()
            await reports.until(lambda: reports.ended(first, second))
            for attempt in (first, second):
                _, error = reports.outcome(attempt)
                assert isinstance(error, BackendError)
                assert "the scheduler went away" in str(error)
                assert isinstance(error.__cause__, RuntimeError)
            assert runner.failure is not None
            assert not runner.is_running()
            first.succeeded("too late")  # the backend's own report now comes too late
            with pytest.raises(BackendError, match="the scheduler went away"):
                runner.launch(Task(square, (3,)))
        finally:
            await runner.stop()
        assert backend.stopped
        assert [kind for kind, _, _ in reports.events] == ["started", "started", "over", "over"]

    run(scenario)


class ReportsAtLaunch(Backend):
    """Runs every attempt inside launch itself: started and succeeded before launch returns."""

    def launch(self, attempts: Sequence[Attempt]) -> None:
        for attempt in attempts:
            attempt.started("inline")
            attempt.succeeded(attempt.task.function(*attempt.task.args))

    def abort(self, attempt: Attempt) -> None:
        pass


def test_callbacks_never_run_inside_launch() -> None:
    reports = Reports()

    async def scenario() -> None:
        runner = reports.runner(ReportsAtLaunch(), workers=2)
        await runner.start()
        try:
            attempt = runner.launch(Task(square, (6,)))
            assert reports.events == [], "a callback ran before launch returned"
            await reports.until(lambda: reports.ended(attempt))
            assert reports.events == [
                ("started", attempt, "inline"),
                ("over", attempt, (36, None)),
            ]
        finally:
            await runner.stop()

    run(scenario)
