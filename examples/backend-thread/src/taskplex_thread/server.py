"""ThreadServer: every task runs in a pool of ``workers`` threads owned by the backend.

Data flow::

    TaskServer ── launch([attempt]) ──► this backend's ThreadPoolExecutor ──► _run(attempt)
         ▲                                                                       │
         └──── attempt.started() / succeeded(result) / failed(exc), from the thread ┘

Written only against taskplex's public API, as any third-party backend would be. The server owns
queueing, timeouts, retries, dependencies, cancellation and hooks; this module only starts and stops
the pool and runs attempts in it, reporting each through its handle (safe from any thread).

A thread cannot be stopped from outside, so the backend declares neither ``cancel_running`` nor
``timeout_kills_work``: a running task that is cancelled runs to its end, and one that times out is
reported FAILED at once while its thread keeps its slot until the function returns. A task cancelled
before its thread picked it up is withdrawn: ``attempt.started()`` then says so and it never runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from taskplex import Capabilities, InvalidOption, TaskServer
from taskplex.backend import Attempt, Backend, BackendContext, run_in_attempt

__all__ = ["ThreadBackend", "ThreadServer"]


class ThreadBackend(Backend):
    """Run plain functions in a pool of threads in the caller's process."""

    # In-process: log records reach the caller's logging by themselves; nothing else is promised.
    capabilities = Capabilities(forwards_logs=True)

    def __init__(self, *, thread_name_prefix: str = "taskplex-thread") -> None:
        if not isinstance(thread_name_prefix, str) or not thread_name_prefix:
            raise InvalidOption(
                f"thread_name_prefix must be a non-empty str, got {thread_name_prefix!r}"
            )
        self.thread_name_prefix = thread_name_prefix
        self._pool: ThreadPoolExecutor | None = None

    async def start(self, context: BackendContext) -> None:
        # The server starts at most `workers` attempts at once. A task that waits for other tasks
        # (run_in_attempt makes that possible) lends its slot meanwhile, so the pool may need a
        # thread more per waiting task: it grows only then.
        self._pool = ThreadPoolExecutor(
            context.workers + 1024, thread_name_prefix=self.thread_name_prefix
        )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Every attempt has been reported over by now, so no thread is busy and this is quick;
            # it still runs off the loop so that the loop never blocks.
            await asyncio.to_thread(pool.shutdown, wait=True)

    def launch(self, attempts: Sequence[Attempt]) -> None:
        assert self._pool is not None, "launch() runs only between start() and stop()"
        for attempt in attempts:
            self._pool.submit(self._run, attempt)

    def abort(self, attempt: Attempt) -> None:
        # Nothing to do: a withdrawn attempt learns it from started(), and a running thread
        # cannot be interrupted (it reports over when its function returns).
        pass

    def _run(self, attempt: Attempt) -> None:
        if not attempt.started(worker=threading.current_thread().name):
            attempt.give_back()
            return
        task = attempt.task
        try:
            result = run_in_attempt(attempt, task.function, *task.args, **task.kwargs)
        except BaseException as exc:  # the task's own failure, SystemExit included
            attempt.failed(exc)
        else:
            attempt.succeeded(result)


class ThreadServer(TaskServer):
    """A server whose tasks run in ``workers`` threads."""

    backend_class = ThreadBackend

    def __init__(
        self, *, workers: int = 1, queue_size: int = 0, thread_name_prefix: str = "taskplex-thread"
    ) -> None:
        backend = ThreadBackend(thread_name_prefix=thread_name_prefix)
        super().__init__(backend, workers=workers, queue_size=queue_size)
