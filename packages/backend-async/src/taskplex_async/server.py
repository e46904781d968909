"""AsyncServer: tasks run in the server's own event loop (coroutines) or thread pool (functions).

Data flow::

    ServerBase ── launch ──► execute(task)
                               │ coroutine function ─► awaited on the loop (cancel/timeout stop it)
                               │ plain function     ─► one of `workers` threads of this server's pool
                               ▼                       (cannot be interrupted: runs to its end)
                          result / exception ─► ServerBase.complete ─► results queue

Plain functions run in a pool owned by the server, sized to ``workers``, rather than in asyncio's
shared default pool, whose own size would silently cap concurrency. A thread cannot be stopped from
outside, so ``cancel_running`` and ``timeout_kills_work`` are not declared: a running function that is
cancelled runs to its end, and one that times out is reported FAILED at once while its thread keeps its
slot until the function returns (its late result is discarded). Coroutines are really cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from taskplex import Capabilities, ServerBase, Task

__all__ = ["AsyncServer"]


class AsyncServer(ServerBase):
    """Run tasks in the caller's process: coroutines on the loop, functions in a thread pool."""

    capabilities = Capabilities(runs_coroutines=True, forwards_logs=True)

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        super().__init__(workers=workers, queue_size=queue_size)
        self._threads: ThreadPoolExecutor | None = None

    async def startup(self) -> None:
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="taskplex-async")

    async def shutdown(self) -> None:
        threads, self._threads = self._threads, None
        if threads is not None:
            # Every attempt has been reported over, so no thread is busy: this returns promptly.
            await asyncio.to_thread(threads.shutdown, wait=True)

    def can_cancel_running(self, task: Task) -> bool:
        return super().can_cancel_running(task) or _is_coroutine_function(task.function)

    async def execute(self, task: Task) -> Any:
        function = task.function
        if _is_coroutine_function(function):
            return await function(*task.args, **task.kwargs)
        assert self._threads is not None
        call = functools.partial(contextvars.copy_context().run, function, *task.args, **task.kwargs)
        running = asyncio.get_running_loop().run_in_executor(self._threads, call)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: hold the slot until it really ends.
            await _wait_uncancellable(running)
            raise


def _is_coroutine_function(function: Any) -> bool:
    while isinstance(function, functools.partial):
        function = function.func
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - async callable objects
    )


async def _wait_uncancellable(future: asyncio.Future[Any]) -> None:
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except Exception:
            return
