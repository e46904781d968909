"""AsyncServer: tasks run in the server's own event loop (coroutines) or thread pool (functions).

Data flow::

    TaskServer ── launch ──► one asyncio task per attempt: attempt.started(), then execute()
                               │ coroutine function ─► awaited on the loop (cancel/timeout stop it)
                               │ plain function     ─► one of `workers` threads of this server's pool
                               ▼                       (cannot be interrupted: runs to its end)
                          attempt.succeeded / attempt.failed ─► the server delivers it

Plain functions run in a pool owned by the backend rather than in asyncio's shared default pool,
whose own size would silently cap concurrency. The server never starts more than ``workers`` of them
at once; the pool may grow beyond that only while tasks wait for other tasks (a task blocked in
``future.result()`` lends its slot, so that waiting inside a task never deadlocks). A thread cannot
be stopped from outside, so ``cancel_running`` and ``timeout_kills_work`` are not declared: a
running function that is cancelled runs to its end, and one that times out is reported FAILED at
once while its thread keeps its slot until the function returns (its late result is discarded).
Coroutines are really cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from taskplex import Capabilities, Task, TaskCancelled, TaskServer
from taskplex.backend import Attempt, BackendContext, CoroutineBackend, is_coroutine_function

__all__ = ["AsyncBackend", "AsyncServer"]

LENDING_HEADROOM = 1024
"""Threads beyond ``workers``, started only for tasks that wait for other tasks of this server."""


STOP_GRACE = 5.0
"""Seconds a cancelled coroutine may take to stop before its slot is given up on (with a warning):
a coroutine that swallows its cancellation cannot hang a timeout or a stop."""
BLOCKING_WARNING = 0.25
"""Seconds one step of a coroutine may hold the event loop before a warning names its task."""

logger = logging.getLogger("taskplex.async")


class AsyncBackend(CoroutineBackend):
    """Run tasks in the caller's process: coroutines on the loop, functions in a thread pool."""

    capabilities = Capabilities(runs_coroutines=True, forwards_logs=True)

    def __init__(self) -> None:
        super().__init__()
        self._threads: ThreadPoolExecutor | None = None

    async def start(self, context: BackendContext) -> None:
        # The server starts at most `workers` attempts at once; more threads than that are only
        # ever busy while tasks wait for other tasks (their slots are lent meanwhile).
        self._threads = ThreadPoolExecutor(
            context.workers + LENDING_HEADROOM, thread_name_prefix="taskplex-async"
        )

    async def stop(self) -> None:
        threads, self._threads = self._threads, None
        if threads is not None:
            # Every attempt has been reported over, so no thread is busy: this returns promptly.
            await asyncio.to_thread(threads.shutdown, wait=True)

    def can_cancel_running(self, task: Task) -> bool:
        return super().can_cancel_running(task) or is_coroutine_function(task.function)

    def abort(self, attempt: Attempt) -> None:
        super().abort(attempt)
        if is_coroutine_function(attempt.task.function):
            asyncio.get_running_loop().call_later(STOP_GRACE, self._give_up_on, attempt)

    def _give_up_on(self, attempt: Attempt) -> None:
        """The coroutine ignored its cancellation: free its slot rather than wait forever."""
        if self.is_running(attempt):
            logger.warning(
                "%r did not stop within %s s of being cancelled (it swallows CancelledError); "
                "its slot is given up on and it is left to finish on its own",
                attempt.task,
                STOP_GRACE,
            )
            attempt.failed(TaskCancelled(f"it did not stop within {STOP_GRACE} s of its cancel"))

    async def execute(self, attempt: Attempt) -> Any:
        task = attempt.task
        function = task.function
        if is_coroutine_function(function):
            return await _StepTimed(function(*task.args, **task.kwargs), task)
        assert self._threads is not None
        # the function sees this context: the caller's context variables and the current attempt
        call = functools.partial(contextvars.copy_context().run, function, *task.args, **task.kwargs)
        running = asyncio.get_running_loop().run_in_executor(self._threads, call)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: hold the slot until it really ends.
            await _wait_uncancellable(running)
            raise


class AsyncServer(TaskServer):
    """A server running coroutines on its event loop and functions in ``workers`` threads."""

    backend_class = AsyncBackend

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        super().__init__(AsyncBackend(), workers=workers, queue_size=queue_size)


class _StepTimed:
    """Awaits a coroutine step by step, warning when one step holds the event loop too long.

    A coroutine that blocks (``time.sleep``, heavy computing) stops every other task of the loop,
    and the server's timers with it; the warning names the task that did it.
    """

    __slots__ = ("_coroutine", "_task")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], task: Task) -> None:
        self._coroutine = coroutine
        self._task = task

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine = self._coroutine
        value: Any = None
        error: BaseException | None = None
        while True:
            started = time.perf_counter()
            try:
                yielded = coroutine.send(value) if error is None else coroutine.throw(error)
            except StopIteration as stop:
                self._check(started)
                return stop.value
            except BaseException:
                self._check(started)
                raise
            self._check(started)
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # a cancellation thrown in by the asyncio task
                value, error = None, exc

    def _check(self, started: float) -> None:
        held = time.perf_counter() - started
        if held > BLOCKING_WARNING:
            logger.warning(
                "%r blocked the event loop for %.2f s in one step: everything else on the loop, "
                "timeouts included, waited; run blocking code in a plain function instead",
                self._task,
                held,
            )


async def _wait_uncancellable(future: asyncio.Future[Any]) -> None:
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except Exception:
            return
