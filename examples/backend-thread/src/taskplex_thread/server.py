"""ThreadServer: every task runs in a pool of ``workers`` threads owned by the server.

Data flow::

    ServerBase ── execute(task) ──► this server's ThreadPoolExecutor ──► function(*args, **kwargs)
         ▲                                                                   │
         └──── result / exception (ServerBase delivers it) ◄────────────────┘

Written only against taskplex's public API, as any third-party backend would be. ServerBase owns
queueing, timeouts, retries, dependencies, cancellation and hooks; this module only starts and stops
the pool and runs one attempt in it.

A thread cannot be stopped from outside, so the server declares neither ``cancel_running`` nor
``timeout_kills_work``: a running task that is cancelled runs to its end, and one that times out is
reported FAILED at once while its thread keeps its slot until the function returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from taskplex import Capabilities, InvalidOption, ServerBase, Task

__all__ = ["ThreadServer"]


class ThreadServer(ServerBase):
    """Run plain functions in a pool of threads in the caller's process."""

    # In-process: log records reach the caller's logging by themselves; nothing else is promised.
    capabilities = Capabilities(forwards_logs=True)

    def __init__(
        self,
        *,
        workers: int = 1,
        queue_size: int = 0,
        thread_name_prefix: str = "taskplex-thread",
    ) -> None:
        super().__init__(workers=workers, queue_size=queue_size)
        if not isinstance(thread_name_prefix, str) or not thread_name_prefix:
            raise InvalidOption(
                f"thread_name_prefix must be a non-empty str, got {thread_name_prefix!r}"
            )
        self.thread_name_prefix = thread_name_prefix
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def conformance_options(cls, tmp_path: Path) -> dict[str, Any]:
        # Threads need nothing from the machine; setting our own option runs it under the suite.
        return {"thread_name_prefix": "taskplex-conformance"}

    async def startup(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.thread_name_prefix)

    async def shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Every attempt has been reported over by now, so no thread is busy and this is quick;
            # it still runs off the loop so that the loop never blocks.
            await asyncio.to_thread(pool.shutdown, wait=True)

    def prepare(self, task: Task) -> None:
        super().prepare(task)
        if inspect.iscoroutinefunction(task.function):
            raise InvalidOption(
                f"{type(self).__name__} runs plain functions, and {task.function!r} is a coroutine "
                'function; use a backend that runs coroutines, e.g. taskplex.Executor("async")'
            )

    async def execute(self, task: Task) -> Any:
        assert self._pool is not None, "execute() runs only between startup() and shutdown()"
        # Like asyncio.to_thread: the function sees the caller's context variables.
        call = functools.partial(
            contextvars.copy_context().run, task.function, *task.args, **task.kwargs
        )
        running = asyncio.get_running_loop().run_in_executor(self._pool, call)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # Cancelled by a timeout, a cancel or a stop. The thread cannot be interrupted, so hold
            # the slot until the function returns: never more than `workers` functions run at once.
            # ServerBase has already settled the task and discards what the function returns.
            await _outlast_cancellation(running)
            raise


async def _outlast_cancellation(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, however often the waiting task is cancelled meanwhile."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])
