"""Executor: a :class:`concurrent.futures.Executor` over any taskplex backend.

Data flow::

    caller thread                         executor thread (runs the server's event loop)
    ─────────────                         ──────────────────────────────────────────────
    submit(fn, *args) ─► Task + TaskFuture
        server.accept(task)   (errors raise here, at the call site)
        batch ── call_soon_threadsafe ──► server.enqueue_accepted(batch) ─► backend
                                                                           │
    future.result() ◄── set_result / set_exception ◄── _FutureDelivery.put(task) ◄┘
    done-callbacks run in a callback thread, never on the loop

Submissions are handed to the loop in batches (one wake-up per batch, not per task). With
``queue_size > 0`` the task queue is bounded and ``submit`` blocks while it is full.

**Lifetime**, as in the standard library's pools: work submitted before the program exits is
completed, also without ``shutdown()`` and after ``shutdown(wait=False)``. The loop thread holds no
reference to its Executor, so an Executor dropped without ``shutdown()`` finishes the work already
submitted and then releases its backend (processes, threads, descriptors) when it is collected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
import functools
import itertools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, NoReturn, ParamSpec, TypeVar, overload

from taskplex._chunks import await_chunk, call_chunk
from taskplex.backend import current_attempt, is_coroutine_function
from taskplex.errors import InvalidOption
from taskplex.journal import Journal
from taskplex.plugins import create_server
from taskplex.progress import ProgressBar
from taskplex.results import ResultsQueue
from taskplex.scheduler import TaskServer
from taskplex.server import Server
from taskplex.task import Task, TaskStatus

__all__ = ["Executor", "TaskFuture"]

P = ParamSpec("P")
T = TypeVar("T")

# the standard library's future states (concurrent.futures._base) in which a future is done
_DONE_STATES = frozenset({"FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"})
_CANCELLED_STATES = frozenset({"CANCELLED", "CANCELLED_AND_NOTIFIED"})


class TaskFuture(cf.Future[Any]):
    """A future bound to its :class:`~taskplex.task.Task` (``future.task``).

    ``cancel()`` follows the standard library: it succeeds only before the task started (a task
    already handed to the backend but not started is withdrawn). To stop a task that is already
    running, call ``future.task.cancel()`` (effective where the backend declares
    ``cancel_running``); the future then raises :class:`~taskplex.errors.TaskCancelled`.

    The futures of one executor share one condition variable instead of making one each (a
    Condition and its lock are most of a future's cost and memory), so ``result()`` and
    ``exception()`` re-check their own state after every wake-up.
    """

    def __init__(self, task: Task, runner: _Runner | None = None) -> None:
        # The standard library's __init__ would make a Condition per future; set its fields here.
        self._condition = threading.Condition() if runner is None else runner.condition
        self._state = "PENDING"
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[cf.Future[Any]], object]] = []
        self._runner = runner
        self.task = task

    # The futures of an executor share one lock, which the loop thread takes to deliver results:
    # the caller's thread takes it only to wait (and then inside try, so that a Ctrl-C landing
    # half-way cannot leave it held). Everything else it calls reads or changes a future's state
    # without the lock, in single atomic steps.

    def cancel(self) -> bool:
        if self._state != "PENDING":
            return self._state in _CANCELLED_STATES
        server = self.task._server
        cancelled = server.cancel_task(self.task, running=False) if server else self.task.cancel()
        if cancelled:
            # The task will never start, so the loop never moves this future to RUNNING; but it
            # may deliver the cancelled task before this line, moving the future on to
            # CANCELLED_AND_NOTIFIED, which must not be set back: wait() would not count it done.
            # So the step is taken under the lock the loop delivers under (the loop wakes waiters
            # when it delivers the task).
            condition = self._condition
            try:
                condition.acquire()
                if self._state == "PENDING":
                    self._state = "CANCELLED"
            finally:
                _release_if_held(condition)
            self._invoke_callbacks()
        return cancelled

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def running(self) -> bool:
        return self._state == "RUNNING"

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def add_done_callback(self, fn: Callable[[cf.Future[Any]], object]) -> None:
        if self._state not in _DONE_STATES:
            self._done_callbacks.append(fn)
            if self._state not in _DONE_STATES:
                return
            try:  # it finished meanwhile: whoever takes the callback off the list calls it
                self._done_callbacks.remove(fn)
            except ValueError:
                return
        _call_back(fn, self)

    def _invoke_callbacks(self) -> None:
        runner = self._runner
        if self._done_callbacks and runner is not None and runner.on_loop_thread():
            # a callback may block (wait for another future): never on the loop that delivers them
            runner.callbacks.run(self._run_callbacks)
        else:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks = self._done_callbacks
        while callbacks:
            try:
                fn = callbacks.pop(0)
            except IndexError:  # add_done_callback took it back to call it itself
                return
            _call_back(fn, self)

    def _wait_done(self, timeout: float | None) -> None:
        if self._state in _DONE_STATES:
            return
        runner = self._runner
        if runner is not None and runner.on_loop_thread():
            raise RuntimeError(
                f"waiting for {self.task!r} on its executor's own event loop would deadlock; "
                "in a coroutine, `await asyncio.wrap_future(future)` instead"
            )
        attempt = current_attempt.get()
        if attempt is not None and runner is not None and attempt._server is runner.server:
            # a task waiting for another task of its own server lends its slots meanwhile, so that
            # waiting never deadlocks, with workers=1 too
            with attempt._lending_slots():
                self._wait_until_done(timeout)
        else:
            self._wait_until_done(timeout)

    def _wait_until_done(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        condition = self._condition
        try:
            condition.acquire()
            while self._state not in _DONE_STATES:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.task!r} did not finish within {timeout} s")
                condition.wait(remaining)
        finally:
            _release_if_held(condition)

    def result(self, timeout: float | None = None) -> Any:
        # A finished future never changes again, so its value can be read without the lock.
        if self._state == "FINISHED" and self._exception is None:
            return self._result
        self._wait_done(timeout)
        if self._state in _CANCELLED_STATES:
            raise cf.CancelledError()
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_done(timeout)
        if self._state in _CANCELLED_STATES:
            raise cf.CancelledError()
        return self._exception


def _call_back(fn: Callable[[cf.Future[Any]], object], future: TaskFuture) -> None:
    try:
        fn(future)
    except Exception:
        logging.getLogger("concurrent.futures").exception("exception calling callback for %r", future)


def _release_if_held(condition: threading.Condition) -> None:
    """Release ``condition`` if this thread holds it: a Ctrl-C may have landed before the acquire
    completed, or inside ``wait()`` while it took the lock back."""
    if condition._is_owned():  # type: ignore[attr-defined]
        condition.release()


class _FutureDelivery(ResultsQueue):
    """Delivers finished tasks into their futures instead of holding them."""

    def put(self, task: Task) -> None:
        future = task._future
        if future is None:
            return
        try:
            if task.status is TaskStatus.SUCCEEDED:
                future.set_result(task.result)
            elif task.status is TaskStatus.CANCELLED and not future.running():
                if future._state == "PENDING":
                    cf.Future.cancel(future)
                else:  # cancelled by the caller's Future.cancel(), which woke nobody
                    with future._condition:
                        future._condition.notify_all()
            else:
                future.set_exception(task.exception)
        except cf.InvalidStateError:
            pass  # the caller cancelled the future meanwhile
        # A future cancelled before it ran must still wake wait() and as_completed(); the
        # standard library does this in set_running_or_notify_cancel, for CANCELLED futures only.
        if future._state == "CANCELLED":
            future.set_running_or_notify_cancel()


class _CallbackThread:
    """Runs futures' done-callbacks in order, in one thread started on first use."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, call: Callable[[], object]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="taskplex-callbacks", daemon=True
                )
                self._thread.start()
        self._calls.put(call)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            call()  # the standard library's _invoke_callbacks logs what a callback raises

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._calls.put(None)
            if thread is not threading.current_thread():
                thread.join()


class _Runner:
    """The loop thread and everything it needs; deliberately holds no reference to the Executor."""

    def __init__(self, server: TaskServer) -> None:
        self.server = server
        self.delivery = _FutureDelivery()
        self.condition = threading.Condition()
        self.callbacks = _CallbackThread()
        self.loop = asyncio.new_event_loop()
        self.pending: list[Task] = []
        self.pending_lock = threading.Lock()
        self.flush_scheduled = False
        self.stop_lock = threading.Lock()
        self.stop_requested: asyncio.Event | None = None
        self.stopping = False
        self.cancel_queued = False
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"taskplex-{type(server).__name__}", daemon=True
        )

    def start(self) -> None:
        _live_runners.add(self)
        self.thread.start()
        self.ready.wait()
        if self.start_error is not None:
            self.thread.join()
            raise self.start_error

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread.ident

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                # as asyncio.run does: join the loop's default pool (used by to_thread) first
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()
                self.callbacks.close()
                _live_runners.discard(self)

    async def _serve(self) -> None:
        self.stop_requested = asyncio.Event()
        if self.stopping:
            self.stop_requested.set()
        async with asyncio.TaskGroup() as task_group:
            try:
                await self.server.start(task_group)
            except BaseException as exc:
                self.start_error = exc
                self.ready.set()
                return
            self.ready.set()
            await self.stop_requested.wait()
            self.flush()  # anything handed over but not yet taken in
            if self.cancel_queued:
                self.server.cancel_queued()
            await self.server.stop(wait=True)

    def flush(self) -> None:
        with self.pending_lock:
            batch, self.pending = self.pending, []
            self.flush_scheduled = False
        self.server.enqueue_accepted(batch)

    def hand_over(self, task: Task) -> None:
        """Give an accepted task to the loop (a batch per loop wake-up)."""
        with self.pending_lock:
            self.pending.append(task)
            if self.flush_scheduled:
                return
            self.flush_scheduled = True
        if self.on_loop_thread():
            self.loop.call_soon(self.flush)
        else:
            self.loop.call_soon_threadsafe(self.flush)

    def force_flush(self) -> None:
        """Wake the loop to take the pending tasks, whatever the flag says."""
        if self.on_loop_thread():
            self.loop.call_soon(self.flush)
        else:
            self.loop.call_soon_threadsafe(self.flush)

    def request_stop(self, *, cancel_futures: bool) -> None:
        """Stop once submitted work is done (cancelling what has not started, if asked)."""
        with self.stop_lock:
            if cancel_futures:
                self.cancel_queued = True
            first = not self.stopping
            self.stopping = True
        if not self.thread.is_alive() or self.loop.is_closed():
            return
        try:
            if first:
                self.loop.call_soon_threadsafe(self._set_stop)
            elif cancel_futures:
                self.loop.call_soon_threadsafe(self.server.cancel_queued)
        except RuntimeError:
            pass  # the loop closed meanwhile: nothing left to stop

    def _set_stop(self) -> None:
        if self.stop_requested is not None:
            self.stop_requested.set()

    def join(self) -> None:
        if not self.on_loop_thread():
            self.thread.join()


_live_runners: set[_Runner] = set()


@functools.cache
def _register_exit_hook() -> None:
    """Finish submitted work at interpreter exit, before the standard library's pools shut down.

    ``threading._register_atexit`` hooks run before non-daemon threads are joined, latest first;
    concurrent.futures.thread registered its own at import, so ours runs while thread pools (which
    backends may use) still accept work.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - every CPython since 3.9 has it
        import atexit

        atexit.register(_finish_all)
    else:
        register(_finish_all)


def _finish_all() -> None:
    for runner in list(_live_runners):
        runner.request_stop(cancel_futures=False)
    for runner in list(_live_runners):
        runner.join()


class Executor(cf.Executor):
    """Run callables on any backend through the standard ``concurrent.futures`` interface.

    ``Executor("mp", workers=4)`` creates the backend's server with those options (an unknown option
    is an error that names the valid ones); an already created, not yet started
    :class:`~taskplex.scheduler.TaskServer` may be passed instead. The server runs in its own event
    loop in one background thread until :meth:`shutdown`.

    ``journal="run.db"`` (a path or a :class:`~taskplex.journal.Journal`) keeps a restart journal:
    a re-run with the same journal returns finished tasks' results without running them again.
    """

    def __init__(
        self,
        backend: str | type[Server] | Server,
        /,
        *,
        journal: Journal | str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(backend, Server):
            if options:
                raise InvalidOption("pass options when creating the server, not with a Server object")
            server = backend
        else:
            server = create_server(backend, **options)
        if not isinstance(server, TaskServer):
            raise InvalidOption(
                f"Executor needs a taskplex.TaskServer (a server built on a taskplex backend), "
                f"got {type(server).__name__}"
            )
        if journal is not None:
            server.journal = journal
        _register_exit_hook()
        self._runner = runner = _Runner(server)
        self._shutdown_lock = threading.Lock()
        self._is_shutdown = False
        runner.start()
        # dropped without shutdown(): finish what was submitted, then release the backend
        self._finalizer = weakref.finalize(self, runner.request_stop, cancel_futures=False)

    def __repr__(self) -> str:
        state = "shut down" if self._is_shutdown else "running"
        return f"<taskplex.Executor {self._runner.server!r} {state}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a taskplex Executor cannot be sent to another process; a task that runs elsewhere "
            "cannot submit to it (return the work to do instead, or use an in-process backend)"
        )

    @property
    def server(self) -> TaskServer:
        """The server this executor drives."""
        return self._runner.server

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
        runner = self._runner
        future = TaskFuture(task, runner)
        task._future = future
        task.results_queue = runner.delivery
        server = runner.server
        # Once accepted, the task must reach the loop, which delivers it: if this thread is
        # interrupted (Ctrl-C) anywhere before handing it over, it is cancelled and handed over.
        handed = False
        try:
            server.accept(task)
            if server.queue_size:
                if runner.on_loop_thread():
                    server.put_accepted_nowait(task)
                else:
                    asyncio.run_coroutine_threadsafe(server.put_accepted(task), runner.loop).result()
            else:
                runner.hand_over(task)
            handed = True
        finally:
            if not handed and task._server is server:
                task.cancel()
                runner.hand_over(task)
                runner.force_flush()  # the interrupt may have landed between flag and wake-up
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: bool | str = False,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`; results come in the order of the inputs.

        With ``chunksize > 1`` each task calls ``fn`` on ``chunksize`` consecutive inputs, which cuts
        the per-task cost for short calls on every backend. As in the standard library's process
        pool, an exception fails its whole chunk and is raised when iteration reaches that chunk.
        ``progress=True`` (or a description) draws a bar of finished calls on standard error.
        When iteration stops early, the calls that have not started are cancelled.
        """
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        end_time = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        if chunksize == 1:
            futures = [(self.submit(fn, *args), 1) for args in calls]
        else:
            run_chunk: Callable[..., Any] = await_chunk if is_coroutine_function(fn) else call_chunk
            chunks = iter(lambda: tuple(itertools.islice(calls, chunksize)), ())
            futures = [(self.submit(run_chunk, fn, chunk), len(chunk)) for chunk in chunks]
        bar = ProgressBar(
            sum(size for _, size in futures),
            shown=bool(progress),
            description=progress if isinstance(progress, str) else None,
        )
        for future, size in futures:
            future.add_done_callback(functools.partial(_advance, bar, size))
        return _results_in_order(futures, end_time, chunksize > 1, bar)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks, then stop the server once submitted tasks are done.

        ``cancel_futures=True`` cancels tasks that have not started. ``wait=True`` blocks until all
        running (and, without cancel_futures, queued) tasks are done and the backend has stopped;
        with ``wait=False`` the work still completes in the background, also if the program exits
        meanwhile. Idempotent.
        """
        with self._shutdown_lock:
            self._is_shutdown = True
        self._finalizer.detach()
        runner = self._runner
        runner.request_stop(cancel_futures=cancel_futures)
        if wait:
            try:
                runner.join()
            except KeyboardInterrupt:
                self._wait_after_interrupt()
                raise

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C in the body: what has not started is cancelled, what runs is waited for
            self._is_shutdown = True
            self._finalizer.detach()
            self._runner.request_stop(cancel_futures=True)
            self._wait_after_interrupt()
        else:
            self.shutdown(wait=True)

    def _wait_after_interrupt(self) -> None:
        """After a first Ctrl-C: say what is waited for; a second Ctrl-C stops running tasks."""
        runner = self._runner
        runner.request_stop(cancel_futures=True)
        running = runner.server.stats.running
        print(
            f"taskplex: interrupted; waiting for {running} running task(s) of {self!r} to end "
            "(tasks not started were cancelled). Press Ctrl-C again to cancel the running ones.",
            file=sys.stderr,
            flush=True,
        )
        try:
            runner.join()
        except KeyboardInterrupt:
            print("taskplex: cancelling the running tasks", file=sys.stderr, flush=True)
            runner.server.cancel()
            runner.join()
            raise


def _results_in_order(
    futures: list[tuple[cf.Future[Any], int]],
    end_time: float | None,
    chunked: bool,
    bar: ProgressBar,
) -> Iterator[Any]:
    """Yield the results of ``futures`` in order; on an early exit, cancel what has not started."""
    pending = [(future, size) for future, size in reversed(futures)]
    del futures  # only `pending` holds them: a result is dropped once yielded
    finished = 0
    try:
        while pending:
            future, size = pending.pop()
            remaining = None if end_time is None else end_time - time.monotonic()
            try:
                result = future.result(remaining)
            except TimeoutError:
                future.cancel()
                raise
            finished += size
            if chunked:
                yield from result
            else:
                yield result
            del future, result
    finally:
        for future, _ in pending:
            future.cancel()
        bar.close(finished)


def _advance(bar: ProgressBar, size: int, _: object) -> None:
    bar.advance(size)
