"""TaskServer: the scheduler every backend plugs into, owning all policy.

Data flow, on the server's event loop unless noted::

    caller ──submit()/Executor──► accept() ─► task_queue ─► _take() ─► ready ─► _pump()
             (any thread: checks,            (bounded:      │ deps pending:    │ slots free:
              names, prepare())              back-pressure) ▼ parked           ▼ an Attempt
                                                        dependents         backend.launch([...])
                                                                                │
    results_queue ◄── _finish() ◄── retry? ◄── attempt.succeeded/failed/give_back ◄┘
                                                attempt.started(): RUNNING, timeout clock

The backend (:mod:`taskplex.backend`) only says how attempts run. This module decides everything
else: per-task ``timeout`` (counted from the attempt's real start; the backend is asked to abort),
``retries`` (infrastructure errors, and user errors when ``retry_user_errors``), ``depends_on``,
unique names, cancellation (a launched attempt that has not started is withdrawn), stopping, hooks
and statistics. A slot is given back only when the backend reports an attempt over, so work that
cannot be stopped still counts against ``workers``; a late or duplicate report is discarded.

A failure inside the server — a backend method or background loop raising unexpectedly — fails the
affected tasks with :class:`~taskplex.errors.BackendError`, or stops the server cleanly saying why;
it never propagates into the caller's task group.

Three audiences use a TaskServer: users (the :class:`~taskplex.server.Server` contract: ``start``,
``submit``, ``task_queue``, ``cancel``, ``stop``, ``join``, ``is_running``), synchronous facades such
as the Executor (``accept``, ``enqueue_accepted``, ``put_accepted``, ``cancel_queued``,
``cancel_task``, ``launch_limit``), and backends, which see only their :class:`~taskplex.backend.
BackendContext` and :class:`~taskplex.backend.Attempt` handles.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from taskplex import plugins
from taskplex._foreign import ForeignTasks, is_foreign_task
from taskplex._supervision import Supervision, backend_failure
from taskplex.backend import (
    LAUNCHED,
    OVER,
    STARTED,
    WITHDRAWN,
    Attempt,
    Backend,
    BackendContext,
    is_coroutine_function,
)
from taskplex.errors import (
    BackendError,
    DependencyFailed,
    DuplicateTaskName,
    InfrastructureError,
    InvalidOption,
    ResourceUnavailable,
    ServerNotRunning,
    TaskCancelled,
    TaskplexError,
    TaskTimeout,
)
from taskplex.journal import Journal, as_journal
from taskplex.keys import task_key
from taskplex.server import Capabilities, Server
from taskplex.task import CLAIM_LOCK, DEFAULT_RESOURCES, Resources, Task, TaskStatus

__all__ = ["ServerStats", "TaskServer", "check_int"]

logger = logging.getLogger("taskplex.server")


_NEW, _STARTING, _RUNNING, _STOPPING, _STOPPED = "new", "starting", "running", "stopping", "stopped"

ABORT_GRACE = 30.0
"""Seconds a stopping server waits for a backend that can stop running work to report its aborted
attempts over, before it stops the backend anyway (and logs which attempts never reported)."""
STOP_TIMEOUT = 120.0
"""Seconds a backend's stop() may take before the server gives up on it (and says so)."""


def check_int(name: str, value: object, minimum: int) -> int:
    """Validate an integer option, with a message that says what was wrong."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidOption(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ServerStats:
    """Counters of one server since it was created, and ``running``: attempts executing now."""

    __slots__ = ("cancelled", "failed", "retried", "running", "submitted", "succeeded")

    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.cancelled = self.retried = 0
        self.running = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


class TaskServer(Server):
    """A :class:`~taskplex.server.Server` that schedules tasks onto a :class:`~taskplex.backend.Backend`.

    Backend distributions subclass it only to give their server a name and a typed constructor::

        class ThreadServer(TaskServer):
            backend_class = ThreadBackend

            def __init__(self, *, workers=1, queue_size=0, thread_name_prefix="t"):
                super().__init__(ThreadBackend(thread_name_prefix), workers=workers,
                                 queue_size=queue_size)
    """

    backend_class: ClassVar[type[Backend] | None] = None
    """The backend this server class builds (lets ``taskplex backends`` list its capabilities)."""

    def __init__(self, backend: Backend, *, workers: int = 1, queue_size: int = 0) -> None:
        if not isinstance(backend, Backend):
            raise InvalidOption(f"a TaskServer needs a taskplex.backend.Backend, got {backend!r}")
        self.backend = backend
        self.workers = check_int("workers", workers, 1)
        self.queue_size = check_int("queue_size", queue_size, 0)
        self.stats = ServerStats()
        self.failure: BaseException | None = None
        """Why the server stopped by itself (a backend failure), or None."""
        self._state = _NEW
        self._refuse_coroutines = not backend.capabilities.runs_coroutines
        # the default slots() is a task's cores: read them directly on the hot path
        self._slots_of = None if type(backend).slots is Backend.slots else backend.slots
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task_group: asyncio.TaskGroup | None = None
        self._queue: asyncio.Queue[Task] = asyncio.Queue(queue_size)
        self._names: set[str] = set()
        self._ready: collections.deque[Task] = collections.deque()
        self._dependents: dict[str, list[Task]] = {}
        self._release_later: list[tuple[Task, list[Task]]] = []
        self._releasing = False
        self._attempts: dict[int, Attempt] = {}
        self._reclaiming: collections.deque[tuple[Attempt, Callable[[], None]]] = collections.deque()
        self._attempt_ids = itertools.count(1)
        self._prefetch = 0
        self._free = workers
        self._pumping = self._pump_again = False
        self._live = 0
        self._capacity = asyncio.Event()
        self._idle = asyncio.Event()
        self._attempts_over = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._supervision = Supervision(self._fail)
        self._hook_submitted: Callable[..., Any] | None = None
        self._hook_started: Callable[..., Any] | None = None
        self._hook_finished: Callable[..., Any] | None = None
        self._hook_lookup: Callable[..., Any] | None = None
        self._hook_delivered: Callable[..., Any] | None = None
        self._journal: Journal | None = None
        self._foreign: ForeignTasks | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} workers={self.workers} {self._state}>"

    # ================================================================== the Server contract

    @property
    def task_queue(self) -> asyncio.Queue[Task]:
        return self._queue

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def task_group(self) -> asyncio.TaskGroup | None:
        return self._task_group

    @property
    def capabilities(self) -> Capabilities:
        """What this server's backend can do (may depend on its options)."""
        return self.backend.capabilities

    @property
    def journal(self) -> Journal | None:
        """The restart journal (:mod:`taskplex.journal`), or None; set it before the server starts.

        Takes a file path or a :class:`~taskplex.journal.Journal`. With a journal, every task gets
        a ``key`` at submit (:func:`taskplex.keys.task_key`), tasks recorded as finished are
        finished from the journal without running, and outcomes are recorded as tasks finish.
        """
        return self._journal

    @journal.setter
    def journal(self, value: Journal | str | Any | None) -> None:
        if self._state in (_STARTING, _RUNNING, _STOPPING):
            raise RuntimeError(f"set the journal of {self!r} before it starts")
        self._journal = as_journal(value)

    def is_running(self) -> bool:
        return self._state == _RUNNING

    async def start(self, task_group: asyncio.TaskGroup) -> None:
        if self._state in (_STARTING, _RUNNING, _STOPPING):
            raise RuntimeError(f"{self!r} is already running; stop it before starting it again")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._task_group = task_group
        # Tasks put on the task queue before start() (or after a stop) are kept. The queue object
        # itself is kept too (callers may hold it, or wrap its methods) unless an earlier event
        # loop bound it: asyncio queues serve one loop only.
        if getattr(self._queue, "_loop", None) not in (None, loop):
            queue: asyncio.Queue[Task] = asyncio.Queue(self.queue_size)
            while not self._queue.empty():
                queue.put_nowait(self._queue.get_nowait())
            self._queue = queue
        self._capacity = asyncio.Event()
        self._idle = asyncio.Event()
        self._attempts_over = asyncio.Event()
        self._attempts_over.set()
        self._prefetch = 0
        self._free = self.workers
        self.failure = None
        self._refuse_coroutines = not self.capabilities.runs_coroutines
        self._stopped = loop.create_future()
        plugins.load_plugins()
        self._snapshot_hooks()
        self._state = _STARTING
        try:
            if self._journal is not None:
                await asyncio.to_thread(self._journal.reopen)  # closed by a previous stop
            await self.backend.start(BackendContext(self))
            if self.failure is not None:
                raise self.failure
        except BaseException:
            # leave the server stopped, so that a cleanup's stop() returns instead of waiting
            await _shielded(self._supervision.close())
            self._state = _STOPPED
            self._stopped.set_result(None)
            raise
        self._state = _RUNNING
        self._main = task_group.create_task(self._run(), name=f"{self!r}")
        # Let the main task enter its try block: a task cancelled before its first step never
        # runs its cleanup, so a stop right after start would otherwise wait forever.
        await asyncio.sleep(0)
        self._call_server_hook(plugins.pm.hook.taskplex_server_started)

    async def submit(self, task: Task) -> Task:
        self.accept(task)
        await self.put_accepted(task)
        return task

    def cancel(self) -> None:
        """Stop the server; queued tasks are delivered CANCELLED, running ones are stopped.

        Returns at once; ``await server.stop()`` also waits until everything has stopped.
        Safe to call from any thread, and more than once.
        """
        if self._state != _RUNNING:
            return
        self._state = _STOPPING
        self._call_on_loop(self._cancel_main)

    async def stop(self, *, wait: bool = False) -> None:
        """Stop the server and wait until it has stopped.

        With ``wait=True``, queued and running tasks are first allowed to finish; otherwise queued
        tasks are cancelled and running ones stopped (see ``capabilities.cancel_running``).
        """
        stopped = self._stopped
        if self._state == _RUNNING:
            if wait:
                await self.join()
            self.cancel()
        if stopped is not None:
            await asyncio.shield(stopped)

    async def join(self) -> None:
        """Wait until every accepted task has reached a terminal state."""
        # Tasks are counted once the loop took them in (tasks put directly on the task queue,
        # once taken off it); an Executor hands its tasks over before it asks for a stop.
        await self._queue.join()
        while self._live > 0:
            self._idle.clear()
            await self._idle.wait()

    # ================================================================== for synchronous facades

    @property
    def launch_limit(self) -> int:
        """How many slots the server hands to its backend at once: ``workers`` plus prefetch."""
        return self.workers + self._prefetch

    def accept(self, task: Task) -> None:
        """Validate ``task``, prepare it and reserve its name; thread-safe. Does not enqueue it.

        Every accepted task must then be handed to the server (``enqueue_accepted`` or
        ``put_accepted``), also if it was cancelled meanwhile: that is where it is delivered.
        """
        if self._state != _RUNNING:
            raise ServerNotRunning(
                f"{self!r} is not running: call `await server.start(task_group)` first"
                if self._state in (_NEW, _STARTING)
                else f"{self!r} has stopped; tasks can no longer be submitted"
                + (f" (it failed: {self.failure})" if self.failure is not None else "")
            )
        if task.status is not TaskStatus.PENDING or task._server is not None:
            raise ValueError(f"{task!r} was already submitted; create a new Task to run it again")
        for dep in task.depends_on:
            if dep._server is not self and not dep.done():
                raise ValueError(f"{task!r} depends on {dep!r}, which was not submitted to this server")
        name = task.name
        if name is not None and name in self._names:
            raise DuplicateTaskName(f"a task named {name!r} was already submitted to {self!r}")
        if self._journal is not None and task.key is None:
            task.key = task_key(task)  # raises UnstableKey, which says how to name the task
        resources = task.resources
        if resources is not DEFAULT_RESOURCES:
            self._check_resources(resources)
        if self._refuse_coroutines and is_coroutine_function(task.function):
            raise InvalidOption(self._no_coroutines(task))
        backend = self.backend
        slots = backend.slots(task)
        if slots > self.workers:
            raise ResourceUnavailable(
                f"{task!r} needs {slots} worker slot(s) for its {task.resources.cores} cores but "
                f"the server has workers={self.workers}; raise workers or ask for fewer cores"
            )
        try:
            prepared = backend.prepare(task)
        except TaskplexError:
            raise
        except Exception as exc:
            raise BackendError(
                f"{type(backend).__name__}.prepare() failed for {task!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if name is not None:
            with self._lock:
                if name in self._names:
                    raise DuplicateTaskName(f"a task named {name!r} was already submitted to {self!r}")
                self._names.add(name)
        with CLAIM_LOCK:
            if task.status is not TaskStatus.PENDING or task._server is not None:
                if name is not None:
                    self._names.discard(name)
                raise ValueError(f"{task!r} was cancelled or submitted elsewhere meanwhile")
            task._prepared = prepared
            task.status = TaskStatus.QUEUED
            task._server = self

    async def put_accepted(self, task: Task) -> None:
        """Put an accepted task on the task queue, waiting while the queue is full."""
        if not self._enqueued(task):
            return
        try:
            await self._queue.put(task)
        except asyncio.CancelledError:
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("submit was cancelled"))
            raise
        if self._state != _RUNNING:
            # the server stopped while this submit waited for room in the queue
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped"))

    def put_accepted_nowait(self, task: Task) -> None:
        """Put an accepted task on the task queue from the loop; raise if the queue is full."""
        if self._queue.full():
            raise RuntimeError(
                f"the task queue of {self!r} is full (queue_size={self.queue_size}) and a task "
                "running in the server's own loop cannot wait for room"
            )
        self.enqueue_accepted([task])

    def enqueue_accepted(self, tasks: Iterable[Task]) -> None:
        """Hand accepted tasks to the server without waiting; call on the loop.

        The Executor's fast path. With an unbounded queue there is no back-pressure to apply, so the
        tasks skip the task queue and go straight to dispatch. Tasks that arrive after the server
        began stopping are delivered CANCELLED.
        """
        running = self._state == _RUNNING
        bounded = self.queue_size > 0
        for task in tasks:
            if not self._enqueued(task):
                continue
            if not running:
                self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped"))
            elif bounded:
                self._queue.put_nowait(task)
            else:
                self._take(task)
        self._pump()

    def cancel_queued(self) -> None:
        """Cancel every task that has not started, also those launched ahead. Call on the loop."""
        for task in self._pending_tasks():
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled before it ran"))
        if not self.capabilities.withdraws_launched:
            return
        for attempt in list(self._attempts.values()):
            if self._withdraw(attempt):
                attempt.task._cancel_requested = True
                self._finish(
                    attempt.task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled before it ran")
                )
                self._safe_abort(attempt)

    def cancel_task(self, task: Task, *, running: bool = True) -> bool:
        """Cancel one task of this server; see :meth:`Task.cancel`. Safe from any thread.

        With ``running=False`` a task that has started is left alone (``Future.cancel``).
        """
        backend = self.backend
        with self._lock:  # one cancel at a time; the loop's side needs no lock (see _new_attempt)
            if task.finished_at is not None:
                return task.status is TaskStatus.CANCELLED
            if task._cancel_requested:
                return True
            attempt: Attempt | None = task._attempt
            if attempt is None:
                task._cancel_requested = True
                # the loop sets task._attempt before it reads _cancel_requested: look again
                attempt = task._attempt
                if attempt is not None:
                    self._withdraw(attempt)
            elif not (backend.capabilities.withdraws_launched and self._withdraw(attempt)):
                # started or claimed (or its outcome is on its way to the loop): only stopping it
                # cancels it
                if not running or (attempt._state is not STARTED and not attempt._claimed):
                    return False
                if not backend.can_cancel_running(task):
                    return False
                task._cancel_requested = True
            else:
                task._cancel_requested = True
        self._call_on_loop(self._cancel_now, task)
        return True

    # ================================================================== backend reports

    @staticmethod
    def _withdraw(attempt: Attempt) -> bool:
        """Take a launched attempt back before it starts; False if it started (or ended) first."""
        try:
            attempt._start_gate.pop()
        except IndexError:
            return False
        attempt._state = WITHDRAWN
        return True

    # Called by the Attempt handle once it won its transition (see backend.Attempt).

    def _attempt_started(self, attempt: Attempt, worker: str | None) -> None:
        if threading.get_ident() == self._loop_thread:
            self._on_started(attempt, worker)
        else:
            self._call_on_loop(self._on_started, attempt, worker)

    def _attempt_over(
        self, attempt: Attempt, result: Any, error: BaseException | None, worker: str | None
    ) -> None:
        state = attempt._state
        if state is LAUNCHED and self._withdraw_as_started(attempt):
            state = STARTED  # a backend that reports only the outcome
        attempt._state = OVER
        if threading.get_ident() == self._loop_thread:
            self._on_over(attempt, state, result, error, worker)
        else:
            self._call_on_loop(self._on_over, attempt, state, result, error, worker)

    @staticmethod
    def _withdraw_as_started(attempt: Attempt) -> bool:
        try:
            (attempt._run_gate if attempt._claimed else attempt._start_gate).pop()
        except IndexError:
            return False
        return True

    def _attempt_given_back(self, attempt: Attempt) -> None:
        state = attempt._state
        if state is LAUNCHED:
            self._withdraw(attempt)  # it can never start now
        attempt._state = OVER
        if state is STARTED:
            backend = type(self.backend).__name__
            error = BackendError(f"{backend} gave back {attempt!r}, which had started")
            self._call_on_loop(self._on_over, attempt, state, None, error, None)
        else:
            self._call_on_loop(self._on_given_back, attempt)

    def _on_started(self, attempt: Attempt, worker: str | None) -> None:
        if attempt._started_here:
            return
        attempt._started_here = True
        if attempt.id in self._attempts:
            self.stats.running += 1
        task = attempt.task
        if task.finished_at is not None:
            return  # cancelled or timed out meanwhile; the abort is on its way
        task.attempts += 1
        if worker is not None:
            task.worker = worker
        if task.status is not TaskStatus.RUNNING:
            task.status = TaskStatus.RUNNING
            task.started_at = time.time()
            future = task._future
            if future is not None:
                future.set_running_or_notify_cancel()
            if self._hook_started is not None:
                self._call_hook(self._hook_started, task)
        if task.timeout is not None:
            attempt._deadline = time.monotonic() + task.timeout
            if attempt._state is not OVER:
                assert self._loop is not None
                attempt._timer = self._loop.call_later(task.timeout, self._time_out, attempt)

    def _on_over(
        self,
        attempt: Attempt,
        state: int,
        result: Any,
        error: BaseException | None,
        worker: str | None,
    ) -> None:
        if not self._release(attempt):
            return
        task = attempt.task
        if task.finished_at is None:
            if not attempt._started_here:
                self._on_started(attempt, worker)
            if worker is not None:
                task.worker = worker
            if attempt._deadline is not None and time.monotonic() > attempt._deadline:
                # the timer could not fire: the loop was blocked past the deadline (by the task)
                error = TaskTimeout(f"{task!r} exceeded its timeout of {task.timeout} s")
            if error is None:
                self._finish(task, TaskStatus.SUCCEEDED, result=result)
            else:
                self._settle_failure(task, error)
        if self._reclaiming:
            self._serve_reclaims()
        if self._state == _RUNNING:
            self._capacity.set()
            self._pump()

    def _on_given_back(self, attempt: Attempt) -> None:
        if not self._release(attempt):
            return
        task = attempt.task
        if task.finished_at is None:
            if self._state == _RUNNING:
                self._ready.appendleft(task)
            else:
                self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped"))
        if self._reclaiming:
            self._serve_reclaims()
        if self._state == _RUNNING:
            self._capacity.set()
            self._pump()

    def _release(self, attempt: Attempt) -> bool:
        """An attempt is over: give back its slots; False if it was over already."""
        if self._attempts.pop(attempt.id, None) is None:
            return False
        if attempt._started_here:
            self.stats.running -= 1
        if attempt._lent:
            self._wake_reclaimer(attempt)
        else:
            self._free += attempt.slots
        if not self._attempts:
            self._attempts_over.set()
        if attempt._timer is not None:
            attempt._timer.cancel()
            attempt._timer = None
        if attempt.task._attempt is attempt:
            attempt.task._attempt = None
        return True

    def _settle_failure(self, task: Task, error: BaseException) -> None:
        if self._should_retry(task, error):
            self.stats.retried += 1
            logger.info("retrying %r after %s: %s", task, type(error).__name__, error)
            if self._state == _RUNNING:
                self._ready.appendleft(task)
            else:
                self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped"))
        else:
            self._finish(task, TaskStatus.FAILED, error=error)

    def _should_retry(self, task: Task, error: BaseException) -> bool:
        if task.attempts > task.retries:
            return False
        if isinstance(error, InfrastructureError):
            return error.retryable
        return task.retry_user_errors and not isinstance(error, TaskplexError)

    def _time_out(self, attempt: Attempt) -> None:
        attempt._timer = None
        task = attempt.task
        if attempt._state is OVER or task.finished_at is not None:
            return
        self._finish(
            task,
            TaskStatus.FAILED,
            error=TaskTimeout(f"{task!r} exceeded its timeout of {task.timeout} s"),
        )
        self._safe_abort(attempt)

    # ================================================================== dispatching

    async def _run(self) -> None:
        """The server's one task in the caller's task group; it never raises into the group."""
        try:
            await self._dispatch()
        except asyncio.CancelledError:
            await _shielded(self._stop_everything())
            raise
        except BaseException as exc:
            logger.exception("%r failed and stops", self)
            if self.failure is None:
                self.failure = BackendError(f"{self!r} failed: {type(exc).__name__}: {exc}")
                self.failure.__cause__ = exc
            await _shielded(self._stop_everything())

    async def _dispatch(self) -> None:
        queue = self._queue
        while True:
            if self._free <= 0 or self._ready:
                self._capacity.clear()
                await self._capacity.wait()
                self._pump()
                continue
            self._take(await queue.get())
            queue.task_done()
            self._pump()

    def _pump(self) -> None:
        """Launch ready tasks while slots are free, pulling more from the task queue as needed.

        Not re-entrant: a backend may report attempts over inside ``launch``, which frees slots
        and calls back here; the outer call then goes round again, so the stack stays flat.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                batch = self._next_attempts()
                if batch:
                    self._launch(batch)
                if not self._pump_again:
                    return
        finally:
            self._pumping = False

    def _next_attempts(self) -> list[Attempt]:
        if self._reclaiming:
            self._serve_reclaims()
        batch: list[Attempt] = []
        queue = self._queue
        ready = self._ready
        slots = self._slots_of
        while self._free > 0 and self._state == _RUNNING:
            if ready:
                task = ready[0]
                if task.finished_at is not None:
                    ready.popleft()
                    continue
                need = task.resources.cores if slots is None else slots(task)
                if need > self._free:
                    break
                ready.popleft()
                attempt = self._new_attempt(task, need)
                if attempt is not None:
                    batch.append(attempt)
            elif queue.qsize():
                self._take(queue.get_nowait())
                queue.task_done()
            else:
                break
        return batch

    def _new_attempt(self, task: Task, slots: int) -> Attempt | None:
        if self._hook_lookup is not None and task.attempts == 0:
            outcome = self._call_hook(self._hook_lookup, task)
            if outcome is not None:
                status = TaskStatus.SUCCEEDED if outcome.exception is None else TaskStatus.FAILED
                self._finish(task, status, result=outcome.result, error=outcome.exception)
                return None
        if self._journal is not None and task.attempts == 0:
            outcome = self._journal.lookup(task)
            if outcome is not None:
                task.worker = "journal"
                status = TaskStatus.SUCCEEDED if outcome.exception is None else TaskStatus.FAILED
                self._finish(task, status, result=outcome.result, error=outcome.exception)
                return None
        attempt = Attempt(self, task, next(self._attempt_ids), slots, task._prepared)
        task._attempt = attempt
        # read after the attempt is set: a cancel in another thread sets the flag before it looks
        # for an attempt, so one of the two sees the other (see cancel_task)
        if task._cancel_requested:
            task._attempt = None
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled before it ran"))
            return None
        if task.launched_at is None:
            task.launched_at = time.time()
        self._free -= slots
        if not self._attempts:
            self._attempts_over.clear()
        self._attempts[attempt.id] = attempt
        return attempt

    def _launch(self, batch: list[Attempt]) -> None:
        try:
            self.backend.launch(batch)
        except Exception as exc:
            logger.exception("%s.launch() failed", type(self.backend).__name__)
            error = BackendError(
                f"{type(self.backend).__name__}.launch() failed: {type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            for attempt in batch:
                attempt.failed(error)

    def _adopt(self, item: Any) -> Task | None:
        """A Task for what was put on the task queue: a foreign task object is adopted
        (:mod:`taskplex._foreign`); anything else fails alone, and None is returned."""
        if isinstance(item, Task):
            return item
        if self._foreign is None:
            self._foreign = ForeignTasks(repr(self))
        if not is_foreign_task(item):
            self._foreign.refuse(
                item,
                TypeError(
                    f"{item!r} was put on the task queue of {self!r}, but it is not a taskplex.Task "
                    "(nor a task object with function, results_queue and put_result, as ropt's)"
                ),
            )
            return None
        try:
            return self._foreign.adopt(item)
        except Exception as exc:
            self._foreign.refuse(item, exc)
            return None

    def _take(self, item: Task) -> None:
        """A task came off the task queue: accept it if it was put there directly, check deps."""
        task = item if isinstance(item, Task) else self._adopt(item)
        if task is None:
            return
        if task.status is TaskStatus.PENDING and task._server is None:
            try:
                self.accept(task)
            except Exception as exc:
                task._server = self
                task.status = TaskStatus.QUEUED
                self._enqueued(task)
                self._finish(task, TaskStatus.FAILED, error=exc)
                return
            if not self._enqueued(task):
                return
        if task.finished_at is not None:
            return
        for dep in task.depends_on:
            if dep.status is TaskStatus.SUCCEEDED:
                continue
            if dep.finished_at is not None:
                self._cancel_dependent(task, dep)
                return
            self._dependents.setdefault(dep.id, []).append(task)
            return
        self._ready.append(task)

    def _enqueued(self, task: Task) -> bool:
        """Loop side of accepting: count it and tell plugins, before it can run or be cancelled.

        Returns False if the task was cancelled before it got here (it is delivered now), or if
        it was handed over twice (a submit interrupted half-way hands it over again).
        """
        if task._enqueued:
            return False
        task.submitted_at = time.time()
        task._enqueued = True
        self.stats.submitted += 1
        self._live += 1
        self._idle.clear()
        if self._hook_submitted is not None:
            self._call_hook(self._hook_submitted, task)
        if task._cancel_requested:
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled before it ran"))
            return False
        return True

    # ================================================================== cancellation

    def _cancel_now(self, task: Task) -> None:
        if task.finished_at is not None or not task._enqueued:
            return  # not enqueued yet: _enqueued() delivers it
        attempt = task._attempt
        self._finish(
            task,
            TaskStatus.CANCELLED,
            error=TaskCancelled(
                "cancelled while running"
                if attempt is not None and attempt._state is STARTED
                else "cancelled before it ran"
            ),
        )
        if attempt is not None:
            self._safe_abort(attempt)

    def _safe_abort(self, attempt: Attempt) -> None:
        if attempt._state is OVER or attempt.id not in self._attempts:
            return
        try:
            self.backend.abort(attempt)
        except Exception as exc:
            # The backend lost track of it: count it over, so that nothing waits for it forever.
            logger.exception("%s.abort() failed for %r", type(self.backend).__name__, attempt)
            error = BackendError(f"{type(self.backend).__name__}.abort() failed: {exc}")
            attempt.failed(error)

    # ================================================================== finishing

    def _finish(
        self,
        task: Task,
        status: TaskStatus,
        *,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """Move a task to its terminal state and deliver it, exactly once."""
        if task.finished_at is not None:
            return
        task.status = status
        task.result = result
        task.exception = error
        task.finished_at = time.time()
        task._prepared = None
        stats = self.stats
        if status is TaskStatus.SUCCEEDED:
            stats.succeeded += 1
        elif status is TaskStatus.FAILED:
            stats.failed += 1
        else:
            stats.cancelled += 1
        if self._hook_finished is not None:
            self._call_hook(self._hook_finished, task)
        if self._journal is not None:
            self._journal.record(task)
        queue = task.results_queue
        if queue is not None:
            queue.put(task)
            if self._hook_delivered is not None:
                self._call_hook(self._hook_delivered, task, results_queue=queue)
        task._future = None
        dependents = self._dependents.pop(task.id, None)
        if dependents:
            self._release_later.append((task, dependents))
            if not self._releasing:
                self._release_all()
        self._live -= 1
        if self._live <= 0:
            self._idle.set()

    def _release_all(self) -> None:
        """Release dependents one level at a time: a chain of any length never recurses deeply."""
        self._releasing = True
        try:
            while self._release_later:
                self._release_dependents(*self._release_later.pop())
        finally:
            self._releasing = False

    def _release_dependents(self, dep: Task, dependents: list[Task]) -> None:
        for task in dependents:
            if task.finished_at is not None:
                continue
            if dep.status is not TaskStatus.SUCCEEDED:
                self._cancel_dependent(task, dep)
            else:
                self._take(task)

    def _cancel_dependent(self, task: Task, dep: Task) -> None:
        cause = dep.exception
        if isinstance(cause, DependencyFailed):
            # a chain: name the direct dependency and the failure at the chain's head, so that the
            # message and the exception chain stay short however long the chain is
            why = f"{cause.dependency} upstream of it did not succeed"
            cause = cause.__cause__
        else:
            why = f"{type(cause).__name__}: {cause}" if cause is not None else "no reason given"
        error = DependencyFailed(
            f"{task!r} was cancelled because its dependency {dep!r} ended {dep.status.value} ({why})",
            dependency=repr(dep)
            if not isinstance(dep.exception, DependencyFailed)
            else dep.exception.dependency,
        )
        error.__cause__ = cause
        self._finish(task, TaskStatus.CANCELLED, error=error)

    # ================================================================== stopping

    def _cancel_main(self) -> None:
        main = self._main
        if main is not None and not main.done():
            main.cancel()

    def _fail(self, error: BaseException, where: str) -> None:
        """The backend cannot go on: stop, failing every unfinished task with the reason."""
        if self.failure is not None or self._state not in (_STARTING, _RUNNING, _STOPPING):
            return
        self.failure = backend_failure(logger, f"{self!r} stopped", error, where)
        self._state = _STOPPING
        self._call_on_loop(self._cancel_main)

    async def _stop_everything(self) -> None:
        self._state = _STOPPING
        failure = self.failure

        def end(task: Task, message: str) -> None:
            if failure is not None:
                self._finish(task, TaskStatus.FAILED, error=failure)
            else:
                self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled(message))

        for task in self._pending_tasks():
            end(task, "the server stopped before it ran")
        for attempt in list(self._attempts.values()):
            self._withdraw(attempt)
            end(attempt.task, "the server stopped")
            self._safe_abort(attempt)
        try:
            await self._wait_for_attempts()
            try:
                await asyncio.wait_for(self.backend.stop(), STOP_TIMEOUT)
            except Exception as exc:
                what = "hung" if isinstance(exc, TimeoutError) else f"failed: {exc}"
                logger.error("%s.stop() %s", type(self.backend).__name__, what, exc_info=exc)
                if self.failure is None:
                    self.failure = BackendError(f"{type(self.backend).__name__}.stop() {what}")
                    self.failure.__cause__ = exc
        finally:
            for attempt in self._attempts.values():
                if attempt._timer is not None:
                    attempt._timer.cancel()
            self._attempts.clear()
            self.stats.running = 0
            reclaiming, self._reclaiming = self._reclaiming, collections.deque()
            for _, wake in reclaiming:
                wake()
            await self._supervision.close()
            if self._journal is not None:
                # every outcome on disk before stop returns; off the loop, bounded
                await asyncio.to_thread(self._journal.close, STOP_TIMEOUT)
            if self._foreign is not None:  # every foreign task told its outcome
                await asyncio.to_thread(self._foreign.drain, STOP_TIMEOUT)
            with self._lock:
                self._names.clear()
            self._state = _STOPPED
            self._idle.set()
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            self._call_server_hook(plugins.pm.hook.taskplex_server_stopped)

    async def _wait_for_attempts(self) -> None:
        if not self._attempts:
            return
        # Work that cannot be stopped (a thread) is waited for; a backend that can stop work has
        # a bound, so that one that never reports cannot hang the stop.
        bound = ABORT_GRACE if self.capabilities.cancel_running else None
        try:
            await asyncio.wait_for(self._attempts_over.wait(), bound)
        except TimeoutError:
            logger.error(
                "%s did not report %d aborted attempt(s) over within %s s: %s",
                type(self.backend).__name__,
                len(self._attempts),
                bound,
                list(self._attempts.values())[:5],
            )

    def _pending_tasks(self) -> list[Task]:
        pending = list(self._ready)
        self._ready.clear()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            self._queue.task_done()
            task = self._adopt(item)
            if task is None:
                continue
            if task.status is TaskStatus.PENDING and task._server is None:
                task._server = self
                task.status = TaskStatus.QUEUED
                self._enqueued(task)
            pending.append(task)
        for waiting in self._dependents.values():
            pending.extend(waiting)
        self._dependents.clear()
        return pending

    # ================================================================== the backend's context

    # ================================================================== lending slots

    def _lend(self, attempt: Attempt) -> None:
        """The attempt's work waits for other tasks: its slots may run them meanwhile."""
        self._call_on_loop(self._on_lend, attempt)

    def _on_lend(self, attempt: Attempt) -> None:
        if attempt._lent or attempt.id not in self._attempts:
            return
        attempt._lent = True
        self._free += attempt.slots
        if self._state == _RUNNING:
            self._capacity.set()
            self._pump()

    def _reclaim(self, attempt: Attempt, wake: Callable[[], None]) -> None:
        """The wait is over: ``wake()`` once the attempt holds its slots again (before new work)."""
        self._call_on_loop(self._on_reclaim, attempt, wake)

    def _on_reclaim(self, attempt: Attempt, wake: Callable[[], None]) -> None:
        if not attempt._lent or attempt.id not in self._attempts:
            attempt._lent = False
            wake()
            return
        self._reclaiming.append((attempt, wake))
        self._serve_reclaims()

    def _serve_reclaims(self) -> None:
        reclaiming = self._reclaiming
        while reclaiming and reclaiming[0][0].slots <= self._free:
            attempt, wake = reclaiming.popleft()
            self._free -= attempt.slots
            attempt._lent = False
            wake()

    def _wake_reclaimer(self, attempt: Attempt) -> None:
        """A lent attempt ended (cancelled while it waited): release whoever waits to reclaim."""
        attempt._lent = False
        for index, (waiting, wake) in enumerate(self._reclaiming):
            if waiting is attempt:
                del self._reclaiming[index]
                wake()
                return

    def _set_prefetch(self, slots: int) -> None:
        check_int("prefetch", slots, 0)
        self._free += slots - self._prefetch
        self._prefetch = slots
        if self._free > 0 and self._state == _RUNNING:
            self._capacity.set()
            self._pump()

    # ================================================================== helpers

    def _check_resources(self, resources: Resources) -> None:
        """Reject resource requests this backend cannot honour, saying which and why."""
        if resources is DEFAULT_RESOURCES:
            return
        supported = self.capabilities.resources
        asked = {
            "cores": resources.cores > 1,
            "gpus": resources.gpus > 0,
            "memory": resources.memory is not None,
            "walltime": resources.walltime is not None,
        }
        for key, requested in asked.items():
            if requested and key not in supported:
                honoured = ", ".join(sorted(supported)) or "none"
                raise ResourceUnavailable(
                    f"{type(self).__name__} cannot honour resources.{key}="
                    f"{getattr(resources, key)!r} (resources it honours: {honoured})"
                )

    def _no_coroutines(self, task: Task) -> str:
        able = [info.name for info in plugins.backends() if info.capabilities.runs_coroutines]
        return (
            f"{task!r} is a coroutine function, and {type(self).__name__} runs plain functions "
            "(it would get a coroutine object back, never awaited); backends that run coroutines: "
            + (", ".join(able) or "none installed (pip install taskplex-backend-async)")
        )

    def _call_on_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is long gone
            loop.call_soon_threadsafe(callback, *args)

    # ================================================================== hooks

    def _snapshot_hooks(self) -> None:
        """Look up per-task hooks once per start, so unimplemented ones cost nothing per task."""
        hook = plugins.pm.hook

        def active(caller: Any) -> Callable[..., Any] | None:
            return caller if caller.get_hookimpls() else None

        self._hook_submitted = active(hook.taskplex_task_submitted)
        self._hook_started = active(hook.taskplex_task_started)
        self._hook_finished = active(hook.taskplex_task_finished)
        self._hook_lookup = active(hook.taskplex_task_lookup)
        self._hook_delivered = active(hook.taskplex_result_delivered)

    def _call_server_hook(self, caller: Callable[..., Any]) -> None:
        try:
            caller(server=self)
        except Exception:
            logger.exception("a taskplex plugin failed in %s for %r", caller, self)

    def _call_hook(self, caller: Callable[..., Any], task: Task, **kwargs: Any) -> Any:
        if "results_queue" not in kwargs:
            kwargs["server"] = self
        try:
            return caller(task=task, **kwargs)
        except Exception:
            logger.exception("a taskplex plugin failed in %s for %r", caller, task)
            return None


async def _shielded(coro: Any) -> None:
    """Run cleanup to its end even if the caller is cancelled again meanwhile."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()
