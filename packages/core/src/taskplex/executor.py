"""Executor: a :class:`concurrent.futures.Executor` over any taskplex backend.

Data flow::

    caller thread                         executor thread (runs the server's event loop)
    ─────────────                         ──────────────────────────────────────────────
    submit(fn, *args) ─► Task + TaskFuture
        server.accept(task)   (errors raise here, at the call site)
        batch ── call_soon_threadsafe ──► server.enqueue_accepted(batch) ─► backend
                                                                           │
    future.result() ◄── set_result / set_exception ◄── _FutureDelivery.put(task) ◄┘

Submissions are handed to the loop in batches (one wake-up per batch, not per task). With
``queue_size > 0`` the task queue is bounded and ``submit`` blocks while it is full.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import functools
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar, overload

from taskplex.plugins import create_server
from taskplex.results import ResultsQueue
from taskplex.server import Server
from taskplex.serverbase import ServerBase
from taskplex.task import Task, TaskStatus

__all__ = ["Executor", "TaskFuture"]

P = ParamSpec("P")
T = TypeVar("T")

_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()
# the standard library's future states (concurrent.futures._base) in which a future is done
_DONE_STATES = frozenset({"FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"})


class TaskFuture(cf.Future[Any]):
    """A future bound to its :class:`~taskplex.task.Task` (``future.task``).

    ``cancel()`` follows the standard library: it succeeds only before the task started. To stop a
    task that is already running, call ``future.task.cancel()`` (effective where the backend
    declares ``cancel_running``); the future then raises :class:`~taskplex.errors.TaskCancelled`.

    The futures of one executor share one condition variable instead of making one each (a
    Condition and its lock are most of a future's cost and memory), so ``result()`` and
    ``exception()`` re-check their own state after every wake-up.
    """

    def __init__(self, task: Task, condition: threading.Condition | None = None) -> None:
        # The standard library's __init__ would make a Condition per future; set its fields here.
        self._condition = threading.Condition() if condition is None else condition
        self._state = "PENDING"
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[cf.Future[Any]], object]] = []
        self.task = task

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self.task.cancel()
        return cancelled

    def _wait_done(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._state not in _DONE_STATES:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.task!r} did not finish within {timeout} s")
                self._condition.wait(remaining)

    def result(self, timeout: float | None = None) -> Any:
        # A finished future never changes again, so its value can be read without the lock.
        if self._state == "FINISHED" and self._exception is None:
            return self._result
        self._wait_done(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_done(timeout)
        return super().exception(0)


class _FutureDelivery(ResultsQueue):
    """Delivers finished tasks into their futures instead of holding them."""

    def put(self, task: Task) -> None:
        future = task._future
        try:
            if task.status is TaskStatus.SUCCEEDED:
                future.set_result(task.result)
            elif task.status is TaskStatus.CANCELLED and not future.running():
                cf.Future.cancel(future)
            else:
                future.set_exception(task.exception)
        except cf.InvalidStateError:
            pass  # the caller cancelled the future meanwhile
        # A future cancelled before it ran must still wake wait() and as_completed(); the
        # standard library does this in set_running_or_notify_cancel, for CANCELLED futures only.
        if future._state == "CANCELLED":
            future.set_running_or_notify_cancel()


class Executor(cf.Executor):
    """Run callables on any backend through the standard ``concurrent.futures`` interface.

    ``Executor("mp", workers=4)`` creates the backend's server with those options (an unknown option
    is an error that names the valid ones); an already created, not yet started
    :class:`~taskplex.server.Server` may be passed instead. The server runs in its own event loop in
    one background thread until :meth:`shutdown`.
    """

    def __init__(self, backend: str | type[Server] | Server, /, **options: Any) -> None:
        if isinstance(backend, Server):
            if options:
                raise TypeError("pass options when creating the server, not with a Server object")
            server = backend
        else:
            server = create_server(backend, **options)
        if not isinstance(server, ServerBase):
            raise TypeError(f"Executor needs a ServerBase subclass, got {type(server).__name__}")
        self._server: ServerBase = server
        self._delivery = _FutureDelivery()
        self._futures_condition = threading.Condition()
        self._shutdown_lock = threading.Lock()
        self._is_shutdown = False
        self._pending: list[Task] = []
        self._pending_lock = threading.Lock()
        self._flush_scheduled = False
        self._loop = asyncio.new_event_loop()
        self._stop_requested: asyncio.Event | None = None
        self._cancel_queued = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"taskplex-{type(server).__name__}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        _live_executors.add(self)

    def __repr__(self) -> str:
        state = "shut down" if self._is_shutdown else "running"
        return f"<taskplex.Executor {self._server!r} {state}>"

    @property
    def server(self) -> ServerBase:
        """The server this executor drives."""
        return self._server

    # ------------------------------------------------------------------ the event-loop thread

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            # as asyncio.run does: join the loop's default pool (used by to_thread) before closing
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        async with asyncio.TaskGroup() as task_group:
            try:
                await self._server.start(task_group)
            except BaseException as exc:
                self._start_error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop_requested.wait()
            if self._cancel_queued:
                self._server.cancel_queued()
            await self._server.stop(wait=True)

    def _flush(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        self._server.enqueue_accepted(batch)

    # ------------------------------------------------------------------ concurrent.futures API

    @overload
    def submit(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> cf.Future[T]: ...

    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return a :class:`TaskFuture`.

        On backends that run coroutines, the future of a coroutine function holds its awaited value.
        """
        return self.submit_task(Task(fn, args, kwargs))

    def submit_task(self, task: Task) -> TaskFuture:
        """Schedule a :class:`~taskplex.task.Task` built with its own policy (timeout, retries...)."""
        if self._is_shutdown:
            raise RuntimeError("cannot schedule new tasks after shutdown")
        future = TaskFuture(task, self._futures_condition)
        task._future = future
        task.results_queue = self._delivery
        server = self._server
        server.accept(task)
        on_loop_thread = threading.get_ident() == self._thread.ident
        if server.queue_size:
            if on_loop_thread:
                server.put_accepted_nowait(task)
            else:
                asyncio.run_coroutine_threadsafe(server.put_accepted(task), self._loop).result()
            return future
        with self._pending_lock:
            self._pending.append(task)
            if self._flush_scheduled:
                return future
            self._flush_scheduled = True
        if on_loop_thread:
            self._loop.call_soon(self._flush)
        else:
            self._loop.call_soon_threadsafe(self._flush)
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`; results come in the order of the inputs.

        With ``chunksize > 1`` each task calls ``fn`` on ``chunksize`` consecutive inputs, which cuts
        the per-task cost for short calls on every backend. As in the standard library's process
        pool, an exception fails its whole chunk and is raised when iteration reaches that chunk.
        """
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        calls = iter(zip(*iterables, strict=False))
        chunks = iter(lambda: tuple(itertools.islice(calls, chunksize)), ())
        per_chunk = super().map(functools.partial(_call_chunk, fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(per_chunk)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks, then stop the server once queued tasks are done.

        ``cancel_futures=True`` cancels tasks that have not started. ``wait=True`` blocks until all
        running (and, without cancel_futures, queued) tasks are done and the backend has stopped.
        Idempotent.
        """
        with self._shutdown_lock:
            first = not self._is_shutdown
            self._is_shutdown = True
        if first and self._thread.is_alive():
            self._cancel_queued = cancel_futures
            stop = self._stop_requested
            if stop is not None:
                self._loop.call_soon_threadsafe(stop.set)
        elif cancel_futures and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._server.cancel_queued)
        if wait and threading.get_ident() != self._thread.ident:
            self._thread.join()
        _live_executors.discard(self)


def _call_chunk(fn: Callable[..., T], calls: tuple[tuple[Any, ...], ...]) -> list[T]:
    """Run one chunk of a chunked map inside a single task."""
    return [fn(*args) for args in calls]


@atexit.register
def _shutdown_all() -> None:
    """Like the standard library's pools: wait for submitted work at interpreter exit."""
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
