"""ServerBase: everything backends share, so that a backend only says how one task is executed.

Data flow, all on the server's event loop unless noted::

    caller ──submit()/Executor──► accept() ──► task_queue ──► _take() ──► ready ──► _start()
              (any thread: checks,              (bounded:       │ deps pending:    (slot taken,
               names, prepare())                back-pressure)  ▼ parked          timer armed)
                                                            dependents            │ launch()
                                                                                  ▼
    results_queue ◄── _finish() ◄── retry? ◄── complete(task, token, result|error) ◄── backend

A backend subclasses ServerBase and implements either

* ``async execute(task) -> result`` — run one attempt and return its value or raise. Cancellation
  arrives as :class:`asyncio.CancelledError`; or
* ``launch(task, token)`` and ``abort(task, token)`` — start an attempt without waiting for it, and
  later call ``self.complete(task, token, result=..., error=...)`` from the loop. This suits backends
  that batch work or learn of completions from elsewhere (pipes, sockets, a scheduler).

Plus, optionally: ``startup()`` / ``shutdown()`` (bring workers up and down), ``prepare(task)``
(called at submit in the submitting thread: serialise, check resources), ``slots_for(task)``,
``can_cancel_running(task)``, and for backends that hand workers tasks ahead of time,
``in_flight_limit()`` with ``attempt_started(task, token)`` (timeouts count from the real start).

Policy owned here: per-task ``timeout`` (a timer per attempt; the backend is asked to ``abort``),
``retries`` (infrastructure errors, and user errors when ``retry_user_errors``), ``depends_on``,
unique names, cancellation, and shutdown. A slot is given back only when the backend reports the
attempt over, so work that cannot be stopped still counts against ``workers``; a late or duplicate
report (after a timeout, a cancel or a retry) is discarded.
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
from pathlib import Path
from typing import Any, ClassVar

from taskplex import plugins
from taskplex.errors import (
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
from taskplex.server import Capabilities, Server
from taskplex.task import DEFAULT_RESOURCES, Resources, Task, TaskStatus

__all__ = ["ServerBase", "ServerStats"]

logger = logging.getLogger("taskplex.server")

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"
_tokens = itertools.count(1)


def check_int(name: str, value: object, minimum: int) -> int:
    """Validate an integer option, with a message that says what was wrong."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidOption(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ServerStats:
    """Counters of one server since it was created."""

    __slots__ = ("cancelled", "failed", "retried", "submitted", "succeeded")

    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.cancelled = self.retried = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


class ServerBase(Server):
    """Shared implementation of :class:`~taskplex.server.Server`; see the module docstring."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    reports_attempt_start: ClassVar[bool] = False
    """True for a backend that calls :meth:`attempt_started`: timeouts then count from that call."""

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        self.workers = check_int("workers", workers, 1)
        self.queue_size = check_int("queue_size", queue_size, 0)
        self.stats = ServerStats()
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task_group: asyncio.TaskGroup | None = None
        self._queue: asyncio.Queue[Task] = asyncio.Queue(queue_size)
        self._names: dict[str, Task] = {}
        self._names_lock = threading.Lock()
        self._ready: collections.deque[Task] = collections.deque()
        self._dependents: dict[int, list[Task]] = {}
        self._running: dict[int, Task] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._exec_tasks: dict[int, asyncio.Task[None]] = {}
        self._free = self._in_flight = self.workers
        self._pumping = False
        self._live = 0
        self._capacity = asyncio.Event()
        self._idle = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._hook_submitted: Callable[..., Any] | None = None
        self._hook_started: Callable[..., Any] | None = None
        self._hook_finished: Callable[..., Any] | None = None
        self._hook_lookup: Callable[..., Any] | None = None
        self._hook_delivered: Callable[..., Any] | None = None

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

    def is_running(self) -> bool:
        return self._state == _RUNNING

    async def start(self, task_group: asyncio.TaskGroup) -> None:
        if self._state in (_RUNNING, _STOPPING):
            raise RuntimeError(f"{self!r} is already running; stop it before starting it again")
        self._loop = asyncio.get_running_loop()
        self._task_group = task_group
        self._queue = asyncio.Queue(self.queue_size)
        self._capacity = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._free = self._in_flight = self.in_flight_limit()
        self._live = 0
        self._stopped = self._loop.create_future()
        plugins.load_plugins()
        self._snapshot_hooks()
        try:
            await self.startup()
        except BaseException:
            # leave the server stopped, so that a cleanup's stop() returns instead of waiting
            self._state = _STOPPED
            self._stopped.set_result(None)
            raise
        self._state = _RUNNING
        self._dispatcher = task_group.create_task(self._dispatch(), name=f"{self!r} dispatcher")
        # Let the dispatcher enter its try block: a task cancelled before its first step never
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
        loop = self._loop
        if self._state != _RUNNING or loop is None:
            return
        self._state = _STOPPING
        if _in_loop(loop):
            self._begin_stop()
        else:
            loop.call_soon_threadsafe(self._begin_stop)

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
        # Tasks put directly on the task queue are counted only once taken off it.
        await self._queue.join()
        await self._idle.wait()

    # ================================================================== backend API

    @classmethod
    def conformance_options(cls, tmp_path: Path) -> dict[str, Any]:
        """Options that make a server the conformance suite can run on this machine.

        ``tmp_path`` is a fresh directory the server may use (a shared work directory, say). The
        suite adds ``workers`` and ``queue_size`` itself. Raise
        :class:`~taskplex.errors.BackendUnavailable` with the reason when the backend cannot run
        here (no scheduler reachable, say): the suite then skips it, saying why.
        """
        return {}

    async def startup(self) -> None:
        """Bring workers up; called by start(). Raise to refuse starting."""

    async def shutdown(self) -> None:
        """Bring workers down; called once per stop, after all tasks were cancelled or finished."""

    def prepare(self, task: Task) -> None:
        """Check (and e.g. serialise) a task at submit; runs in the submitting thread.

        The default checks resource requests against ``capabilities.resources`` and ``workers``.
        Raise a :class:`~taskplex.errors.TaskplexError` subclass to reject the task.
        """
        self.check_resources(task.resources)

    def check_resources(self, resources: Resources) -> None:
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
        if resources.cores > self.workers:
            raise ResourceUnavailable(
                f"task asks for {resources.cores} cores but the server has workers={self.workers}"
            )

    def in_flight_limit(self) -> int:
        """How many slots the server hands out at once (default ``workers``).

        A backend that pipelines work (sends a worker its next tasks before the current one ends)
        returns more, and makes sure that no more than ``workers`` tasks really execute at once.
        Read at start, and again when the backend calls :meth:`in_flight_limit_changed`.
        """
        return self.workers

    def in_flight_limit_changed(self) -> None:
        """Re-read :meth:`in_flight_limit`, whose answer changed; call on the loop.

        A lower limit takes effect as running attempts end; a higher one starts tasks at once.
        """
        limit = self.in_flight_limit()
        self._free += limit - self._in_flight
        self._in_flight = limit
        if self._free > 0 and self._state == _RUNNING:
            self._capacity.set()
            self._pump()

    def attempt_started(self, task: Task, token: int) -> None:
        """Report that a launched attempt began executing; call on the loop.

        Only for backends with ``reports_attempt_start``, which launch attempts ahead of a free
        worker (see :meth:`in_flight_limit`): the task's timeout counts from here, not from launch.
        """
        if task.timeout is not None and token in self._running and token not in self._timers:
            self._arm_timeout(task, token)

    def can_cancel_running(self, task: Task) -> bool:
        """Whether cancelling ``task`` while it runs stops its work (default: the capability).

        A backend that can stop some work but not all (coroutines, not threads) answers per task.
        """
        return self.capabilities.cancel_running

    def slots_for(self, task: Task) -> int:
        """How many of the ``workers`` slots a task occupies while it runs (default: its cores)."""
        return task.resources.cores

    async def execute(self, task: Task) -> Any:
        """Run one attempt of ``task`` and return its result (the simple backend API)."""
        raise NotImplementedError(f"{type(self).__name__} must implement execute() or launch()")

    def launch(self, task: Task, token: int) -> None:
        """Start one attempt of ``task``; report it with ``complete(task, token, ...)``."""
        exec_task = asyncio.get_running_loop().create_task(self._execute_attempt(task, token))
        self._exec_tasks[token] = exec_task

    def abort(self, task: Task, token: int) -> None:
        """Stop a running attempt (cancel, timeout, stop); the backend still reports it over."""
        exec_task = self._exec_tasks.get(token)
        if exec_task is not None:
            exec_task.cancel()

    def complete(
        self,
        task: Task,
        token: int,
        *,
        result: Any = None,
        error: BaseException | None = None,
        worker: str | None = None,
    ) -> None:
        """Report an attempt over; call on the loop. Stale or duplicate reports are discarded."""
        if self._running.pop(token, None) is None:
            return
        self._free += self.slots_for(task)
        self._capacity.set()
        timer = self._timers.pop(token, None)
        if timer is not None:
            timer.cancel()
        if not task.done():
            if worker is not None:
                task.worker = worker
            if error is None:
                self._finish(task, TaskStatus.SUCCEEDED, result=result)
            elif self._should_retry(task, error):
                self.stats.retried += 1
                logger.info("retrying %r after %s: %s", task, type(error).__name__, error)
                if self._state == _RUNNING:
                    self._ready.appendleft(task)
                else:
                    self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("server stopped"))
            else:
                self._finish(task, TaskStatus.FAILED, error=error)
        if self._state == _RUNNING:
            self._pump()

    # ================================================================== submission

    def accept(self, task: Task) -> None:
        """Validate ``task`` and reserve its name; thread-safe. Does not enqueue it."""
        if self._state != _RUNNING:
            raise ServerNotRunning(
                f"{self!r} is not running: call `await server.start(task_group)` first"
                if self._state == _NEW
                else f"{self!r} has stopped; tasks can no longer be submitted"
            )
        if task.status is not TaskStatus.PENDING:
            raise ValueError(f"{task!r} was already submitted; create a new Task to run it again")
        for dep in task.depends_on:
            if dep._server is not self and not dep.done():
                raise ValueError(f"{task!r} depends on {dep!r}, which was not submitted to this server")
        name = task.name
        if name is not None and name in self._names:
            raise DuplicateTaskName(f"a task named {name!r} was already submitted to {self!r}")
        self.prepare(task)
        if name is not None:
            with self._names_lock:
                if name in self._names:
                    raise DuplicateTaskName(f"a task named {name!r} was already submitted to {self!r}")
                self._names[name] = task
        task._server = self
        task.status = TaskStatus.QUEUED

    def _enqueued(self, task: Task) -> None:
        """Loop side of accepting: count it and tell plugins, before it can run or be cancelled."""
        task.submitted_at = time.time()
        self.stats.submitted += 1
        self._live += 1
        self._idle.clear()
        if self._hook_submitted is not None:
            self._call_hook(self._hook_submitted, task)

    async def put_accepted(self, task: Task) -> None:
        """Put an accepted task on the task queue, waiting while the queue is full."""
        self._enqueued(task)
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
            self._enqueued(task)
            if not running:
                self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped"))
            elif bounded:
                self._queue.put_nowait(task)
            else:
                self._take(task)
        self._pump()

    def cancel_queued(self) -> None:
        """Cancel every task that has not started; running tasks go on. Call on the loop."""
        for task in self._pending_tasks():
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled before it ran"))

    # ================================================================== dispatching

    async def _dispatch(self) -> None:
        try:
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
        except BaseException:
            await _shielded(self._stop_everything())
            raise

    def _pump(self) -> None:
        """Start ready tasks while slots are free, pulling more from the task queue as needed.

        Not re-entrant: a backend may complete an attempt inside ``launch``, which frees a slot and
        calls back here; the outer call's loop then picks the slot up, so the stack stays flat.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            queue = self._queue
            ready = self._ready
            while self._free > 0 and self._state == _RUNNING:
                if ready:
                    task = ready[0]
                    if task.done():
                        ready.popleft()
                        continue
                    need = self.slots_for(task)
                    if need > self._free:
                        return
                    ready.popleft()
                    self._start(task, need)
                elif queue.qsize():
                    self._take(queue.get_nowait())
                    queue.task_done()
                else:
                    return
        finally:
            self._pumping = False

    def _take(self, task: Task) -> None:
        """A task came off the task queue: accept it if it was put there directly, check deps."""
        if task.status is TaskStatus.PENDING:
            try:
                self.accept(task)
            except (TaskplexError, ValueError, TypeError) as exc:
                task._server = self
                self._enqueued(task)
                self._finish(task, TaskStatus.FAILED, error=exc)
                return
            self._enqueued(task)
        if task.done():
            return
        for dep in task.depends_on:
            if dep.status is TaskStatus.SUCCEEDED:
                continue
            if dep.done():
                self._cancel_dependent(task, dep)
                return
            self._dependents.setdefault(dep.id, []).append(task)
            return
        self._ready.append(task)

    def _start(self, task: Task, need: int) -> None:
        if self._hook_lookup is not None and task.attempts == 0:
            outcome = self._call_hook(self._hook_lookup, task)
            if outcome is not None:
                status = TaskStatus.SUCCEEDED if outcome.exception is None else TaskStatus.FAILED
                self._finish(task, status, result=outcome.result, error=outcome.exception)
                return
        future = task._future
        if future is not None and task.attempts == 0 and not future.set_running_or_notify_cancel():
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled by caller"))
            return
        self._free -= need
        task.attempts += 1
        token = next(_tokens)
        task._token = token
        self._running[token] = task
        if task.status is not TaskStatus.RUNNING:
            task.status = TaskStatus.RUNNING
            task.started_at = time.time()
            if self._hook_started is not None:
                self._call_hook(self._hook_started, task)
        if task.timeout is not None and not self.reports_attempt_start:
            self._arm_timeout(task, token)
        try:
            self.launch(task, token)
        except Exception as exc:
            logger.exception("%s.launch failed for %r", type(self).__name__, task)
            self.complete(task, token, error=exc)

    def _arm_timeout(self, task: Task, token: int) -> None:
        assert self._loop is not None
        assert task.timeout is not None
        self._timers[token] = self._loop.call_later(task.timeout, self._time_out, task, token)

    async def _execute_attempt(self, task: Task, token: int) -> None:
        try:
            result = await self.execute(task)
        except asyncio.CancelledError:
            self.complete(task, token, error=TaskCancelled("attempt aborted"))
        except BaseException as exc:
            self.complete(task, token, error=exc)
        else:
            self.complete(task, token, result=result)
        finally:
            self._exec_tasks.pop(token, None)

    def _should_retry(self, task: Task, error: BaseException) -> bool:
        if task.attempts > task.retries:
            return False
        if isinstance(error, InfrastructureError):
            return True
        return task.retry_user_errors and not isinstance(error, TaskplexError)

    def _time_out(self, task: Task, token: int) -> None:
        self._timers.pop(token, None)
        if token not in self._running or task.done():
            return
        self._finish(
            task,
            TaskStatus.FAILED,
            error=TaskTimeout(f"{task!r} exceeded its timeout of {task.timeout} s"),
        )
        self._safe_abort(task, token)

    # ================================================================== cancellation

    def cancel_task(self, task: Task) -> bool:
        """Cancel one task of this server; see :meth:`Task.cancel`. Safe from any thread."""
        loop = self._loop
        if task.done() or loop is None:
            return task.cancelled()
        if _in_loop(loop):
            return self._cancel_now(task)
        loop.call_soon_threadsafe(self._cancel_now, task)
        return task.status is not TaskStatus.RUNNING or self.can_cancel_running(task)

    def _cancel_now(self, task: Task) -> bool:
        if task.done():
            return task.cancelled()
        if task.status is TaskStatus.RUNNING:
            if not self.can_cancel_running(task):
                return False
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled while running"))
            self._safe_abort(task, task._token)
            return True
        self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("cancelled before it ran"))
        return True

    def _safe_abort(self, task: Task, token: int) -> None:
        if token not in self._running:
            return
        try:
            self.abort(task, token)
        except Exception:
            logger.exception("%s.abort failed for %r", type(self).__name__, task)

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
        if task.done():
            return
        task.status = status
        task.result = result
        task.exception = error
        task.finished_at = time.time()
        task.payload = None
        stats = self.stats
        if status is TaskStatus.SUCCEEDED:
            stats.succeeded += 1
        elif status is TaskStatus.FAILED:
            stats.failed += 1
        else:
            stats.cancelled += 1
        if self._hook_finished is not None:
            self._call_hook(self._hook_finished, task)
        queue = task.results_queue
        if queue is not None:
            queue.put(task)
            if self._hook_delivered is not None:
                self._call_hook(self._hook_delivered, task, results_queue=queue)
        dependents = self._dependents.pop(task.id, None)
        if dependents:
            self._release_dependents(task, dependents)
        self._live -= 1
        if self._live <= 0:
            self._idle.set()

    def _release_dependents(self, dep: Task, dependents: list[Task]) -> None:
        for task in dependents:
            if task.done():
                continue
            if dep.status is not TaskStatus.SUCCEEDED:
                self._cancel_dependent(task, dep)
            else:
                self._take(task)

    def _cancel_dependent(self, task: Task, dep: Task) -> None:
        error = DependencyFailed(f"dependency {dep!r} ended {dep.status.value}")
        self._finish(task, TaskStatus.CANCELLED, error=error)

    # ================================================================== stopping

    def _begin_stop(self) -> None:
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()

    async def _stop_everything(self) -> None:
        self._state = _STOPPING
        for task in self._pending_tasks():
            self._finish(
                task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped before it ran")
            )
        for token, task in list(self._running.items()):
            self._finish(task, TaskStatus.CANCELLED, error=TaskCancelled("the server stopped"))
            self._safe_abort(task, token)
        if self._exec_tasks:
            await asyncio.gather(*self._exec_tasks.values(), return_exceptions=True)
        try:
            await self.shutdown()
        finally:
            self._running.clear()
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            with self._names_lock:
                self._names.clear()
            self._state = _STOPPED
            self._idle.set()
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            self._call_server_hook(plugins.pm.hook.taskplex_server_stopped)

    def _pending_tasks(self) -> list[Task]:
        pending = list(self._ready)
        self._ready.clear()
        while not self._queue.empty():
            task = self._queue.get_nowait()
            self._queue.task_done()
            if task.status is TaskStatus.PENDING:
                task._server = self
                self._enqueued(task)
            pending.append(task)
        for waiting in self._dependents.values():
            pending.extend(waiting)
        self._dependents.clear()
        return pending

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


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _shielded(coro: Any) -> None:
    """Run cleanup to its end even if the caller is cancelled again meanwhile."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()
