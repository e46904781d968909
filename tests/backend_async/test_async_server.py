"""AsyncServer specifics: its own thread pool, real cancellation of coroutines, and what it awaits."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import taskplex
from taskplex import ResultsQueue, Task, TaskCancelled, TaskStatus, TaskTimeout
from taskplex_async import AsyncServer

BOUND = 30.0
"""Seconds a test waits for something that should happen, so that it fails instead of hanging."""

T = TypeVar("T")


def serve(server: AsyncServer, scenario: Callable[[AsyncServer], Awaitable[T]]) -> T:
    """Run ``scenario(server)`` with the server started in a task group; stop it afterwards."""

    async def main() -> T:
        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            try:
                return await asyncio.wait_for(scenario(server), BOUND)
            finally:
                await server.stop()

    return asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_backend_is_registered_with_its_capabilities() -> None:
    [info] = [info for info in taskplex.backends() if info.name == "async"]
    assert info.server_class is AsyncServer
    assert info.capabilities.runs_coroutines
    assert not info.capabilities.cancel_running, "threads cannot be stopped"


def test_functions_run_in_the_servers_own_threads() -> None:
    with taskplex.Executor("async", workers=2) as executor:
        names = set(executor.map(lambda _: threading.current_thread().name, range(8)))
    assert names
    assert all(name.startswith("taskplex-async") for name in names), names


def test_concurrency_reaches_workers_beyond_asyncios_default_pool() -> None:
    workers = 40
    everyone_there = threading.Barrier(workers, timeout=BOUND)
    # If fewer than `workers` functions ran at once, the barrier would break instead.
    with taskplex.Executor("async", workers=workers) as executor:
        arrivals = list(executor.map(lambda _: everyone_there.wait(), range(workers)))
    assert sorted(arrivals) == list(range(workers))


def test_concurrency_never_exceeds_workers() -> None:
    workers, tasks = 3, 12
    running, peak = [0], [0]
    lock = threading.Lock()
    groups = threading.Barrier(workers, timeout=BOUND)

    def measured(_: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        groups.wait()
        with lock:
            running[0] -= 1

    with taskplex.Executor("async", workers=workers) as executor:
        list(executor.map(measured, range(tasks)))
    assert peak[0] == workers


async def sleep_then_mark(seconds: float, marker_dir: Path) -> str:
    (marker_dir / "started").touch()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        (marker_dir / "cancelled").touch()
        raise
    (marker_dir / "finished").touch()
    return "finished"


def test_cancel_really_cancels_a_running_coroutine(tmp_path: Path) -> None:
    queue = ResultsQueue()
    nap = 1.0
    task = Task(sleep_then_mark, (nap, tmp_path), results_queue=queue)

    async def scenario(server: AsyncServer) -> None:
        await server.submit(task)
        await until((tmp_path / "started").exists)
        assert task.cancel() is True
        await asyncio.wait_for(queue.get(), BOUND)
        # long enough that a coroutine still running would have marked it finished
        await asyncio.sleep(2 * nap)

    serve(AsyncServer(), scenario)
    assert task.status is TaskStatus.CANCELLED
    assert isinstance(task.exception, TaskCancelled)
    assert (tmp_path / "cancelled").exists()
    assert not (tmp_path / "finished").exists()


def test_cancel_of_a_running_coroutine_through_the_executor(tmp_path: Path) -> None:
    with taskplex.Executor("async") as executor:
        future = executor.submit(sleep_then_mark, BOUND, tmp_path)
        deadline = time.monotonic() + BOUND
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert future.cancel() is False, "like the standard library: it has started"
        assert future.task.cancel() is True  # type: ignore[attr-defined]
        assert isinstance(future.exception(timeout=BOUND), TaskCancelled)
    assert (tmp_path / "cancelled").exists()
    assert not (tmp_path / "finished").exists()


def test_cancel_of_a_running_function_lets_it_finish(tmp_path: Path) -> None:
    release = threading.Event()

    def blocking() -> str:
        (tmp_path / "started").touch()
        release.wait(BOUND)
        return "finished"

    queue = ResultsQueue()
    task = Task(blocking, results_queue=queue)

    async def scenario(server: AsyncServer) -> None:
        await server.submit(task)
        await until((tmp_path / "started").exists)
        assert task.cancel() is False
        release.set()
        await asyncio.wait_for(queue.get(), BOUND)

    serve(AsyncServer(), scenario)
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result == "finished"


def test_timeout_really_cancels_a_coroutine(tmp_path: Path) -> None:
    queue = ResultsQueue()
    nap = 1.0
    task = Task(sleep_then_mark, (nap, tmp_path), timeout=0.05, results_queue=queue)

    async def scenario(server: AsyncServer) -> None:
        await server.submit(task)
        await asyncio.wait_for(queue.get(), BOUND)
        await asyncio.sleep(2 * nap)

    serve(AsyncServer(), scenario)
    assert task.status is TaskStatus.FAILED
    assert isinstance(task.exception, TaskTimeout)
    assert (tmp_path / "cancelled").exists()
    assert not (tmp_path / "finished").exists()


def test_timed_out_function_keeps_its_thread_slot_until_it_returns(tmp_path: Path) -> None:
    release = threading.Event()
    first_done = tmp_path / "first-done"

    def stuck() -> None:
        release.wait(BOUND)
        first_done.touch()

    def next_in_line() -> bool:
        return first_done.exists()

    queue = ResultsQueue()
    first = Task(stuck, timeout=0.05, results_queue=queue)
    second = Task(next_in_line, results_queue=queue)

    async def scenario(server: AsyncServer) -> None:
        await server.submit(first)
        await server.submit(second)
        assert await asyncio.wait_for(queue.get(), BOUND) is first
        await asyncio.sleep(0.05)
        assert second.status is TaskStatus.QUEUED, "the only thread is still busy"
        release.set()
        assert await asyncio.wait_for(queue.get(), BOUND) is second

    serve(AsyncServer(workers=1), scenario)
    assert isinstance(first.exception, TaskTimeout)
    assert second.result is True, "the second task started only after the first thread ended"


async def scaled(x: int, factor: int) -> int:
    await asyncio.sleep(0)
    return x * factor


class AsyncDoubler:
    """An object whose ``__call__`` is a coroutine function."""

    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x


@pytest.mark.parametrize(
    "function",
    [
        scaled,
        functools.partial(scaled, factor=2),
        functools.partial(functools.partial(scaled), factor=2),
        AsyncDoubler(),
    ],
    ids=["coroutine-function", "partial", "nested-partial", "async-callable"],
)
def test_coroutine_callables_are_awaited(function: Callable[..., Any]) -> None:
    args = (21, 2) if function is scaled else (21,)
    with taskplex.Executor("async") as executor:
        assert executor.submit(function, *args).result(timeout=BOUND) == 42


def test_coroutines_run_on_the_servers_loop() -> None:
    async def which_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    queue = ResultsQueue()

    async def scenario(server: AsyncServer) -> bool:
        await server.submit(Task(which_loop, results_queue=queue))
        task = await asyncio.wait_for(queue.get(), BOUND)
        return bool(task.result is server.loop)

    assert serve(AsyncServer(), scenario)


def test_user_exception_arrives_as_itself() -> None:
    class Misfit(Exception):
        pass

    def raises() -> None:
        raise Misfit("does not fit")

    with taskplex.Executor("async") as executor:
        error = executor.submit(raises).exception(timeout=BOUND)
    assert type(error) is Misfit
    assert str(error) == "does not fit"


def test_bad_options_are_rejected() -> None:
    with pytest.raises(taskplex.InvalidOption, match="workers must be an int >= 1"):
        AsyncServer(workers=0)
    with pytest.raises(taskplex.InvalidOption, match="queue_size must be an int >= 0"):
        AsyncServer(queue_size=-1)


# ------------------------------------------------------------------------------ misbehaving coroutines


async def swallows_cancellation() -> str:
    while True:
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            continue  # refuses to stop


async def blocks_the_loop(seconds: float) -> str:
    time.sleep(seconds)  # a blocking call inside a coroutine
    return "too late"


def test_a_coroutine_that_swallows_its_cancellation_cannot_hang_the_shutdown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from taskplex_async import server

    monkeypatch.setattr(server, "STOP_GRACE", 0.3)
    executor = taskplex.Executor("async", workers=1)
    stubborn = executor.submit_task(Task(swallows_cancellation, timeout=0.1))
    assert isinstance(stubborn.exception(timeout=BOUND), TaskTimeout)
    after = executor.submit(abs, -2)
    assert after.result(timeout=BOUND) == 2, "the slot of the stubborn coroutine was given up on"
    done = threading.Thread(target=executor.shutdown)
    done.start()
    done.join(BOUND)
    assert not done.is_alive(), "shutdown hung on a coroutine that swallows its cancellation"
    assert "did not stop within 0.3 s" in caplog.text
    assert "swallows_cancellation" in caplog.text


def test_a_coroutine_blocking_the_loop_past_its_timeout_is_timed_out_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with taskplex.Executor("async", workers=2) as executor:
        future = executor.submit_task(Task(blocks_the_loop, (0.6,), timeout=0.2))
        error = future.exception(timeout=BOUND)
    assert isinstance(error, TaskTimeout), repr(error)
    assert future.task.result is None, "its late result is discarded"
    assert "blocked the event loop for 0.6" in caplog.text
    assert "blocks_the_loop" in caplog.text
