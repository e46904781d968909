"""The backend contract: what a backend author implements, and the handles it reports through.

A backend says only how work is executed. taskplex's :class:`~taskplex.scheduler.TaskServer` owns
everything else — queueing, statuses, hooks, timeouts, retries, dependencies, names, cancellation,
stopping and statistics — and drives the backend through this narrow interface::

    TaskServer ── start(context) ─────────► Backend    bring workers up (context: loop, workers,
               ── prepare(task) ──────────►            supervised loops, blocking calls off the loop)
               ── launch([attempt, ...]) ─►            start attempts; never blocks
               ── abort(attempt) ─────────►            withdraw it, or stop its work
               ── stop() ─────────────────►            bring workers down
                                                  │
               ◄── attempt.started() ─────────────┤    the work began (False: it was withdrawn)
               ◄── attempt.succeeded(result) ─────┤    ... or failed(error), or
               ◄── attempt.give_back() ───────────┘    it never started: run it again later

A backend never reads or writes the server's state, and the server never reads the backend's: all
they share is this module's vocabulary and the public fields of :class:`~taskplex.task.Task`.

**Attempts.** Each time the server wants a task run it creates an :class:`Attempt` and passes it to
:meth:`Backend.launch`, which must return at once. An attempt that was launched but has not started
(prefetched to a worker, a pending cluster job, waiting in a broker) is not RUNNING: the task's
status, ``started_at``, the ``started`` hook, ``Future.running()`` and the timeout clock all begin
when the backend calls :meth:`Attempt.started`. Every attempt is reported over exactly once — by
:meth:`Attempt.succeeded`, :meth:`Attempt.failed` or :meth:`Attempt.give_back` — and until then it
holds its slots, so work that could not be stopped still counts against ``workers``. Reports are safe
from any thread; reports after the first are ignored.

**Withdrawing.** When the server no longer wants an attempt (its task was cancelled, timed out, or
the server is stopping) it calls :meth:`Backend.abort`. An attempt that had not started is withdrawn:
:meth:`Attempt.started` returns False from then on, and the backend must not begin its work (or must
stop it at once where it learns too late that it began elsewhere). A started attempt is stopped where
the backend can (``cancel_running``). Either way the backend then reports it over.

**Capabilities.** A backend declares what it can do in :class:`~taskplex.server.Capabilities`; the
conformance suite gates its tests on them. They may depend on the options a backend was built with.

**Without a scheduler.** A program that schedules by itself — a relay such as the zmq worker host,
which runs what a broker already scheduled — drives a backend through a :class:`Runner` (defined
in :mod:`taskplex.runner`) instead: the same handles and context, with no policy at all.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from taskplex.errors import TaskCancelled
from taskplex.server import Capabilities

if TYPE_CHECKING:
    from taskplex._supervision import Supervision
    from taskplex.runner import Runner
    from taskplex.task import Task

__all__ = [
    "Attempt",
    "Backend",
    "BackendContext",
    "Capabilities",
    "CoroutineBackend",
    "Runner",
    "current_attempt",
    "is_coroutine_function",
    "run_in_attempt",
]

T = TypeVar("T")

# Attempt states. Who leaves LAUNCHED first — a start in one thread or a withdrawal in another —
# and which report ends the attempt are decided by popping a one-item list (an atomic step), so
# the server takes no lock on the path of every task.
LAUNCHED, STARTED, WITHDRAWN, OVER = 0, 1, 2, 3

current_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "taskplex_current_attempt", default=None
)
"""The attempt whose work runs in this context, where an in-process backend set it (see
:func:`run_in_attempt`). A task that waits there for other tasks lends its slots meanwhile."""


def __getattr__(name: str) -> object:
    # the Runner's module imports this one: it is imported when first asked for
    if name == "Runner":
        from taskplex.runner import Runner

        return Runner
    raise AttributeError(f"module 'taskplex.backend' has no attribute {name!r}")


class _Driver(Protocol):
    """What the handles of this module call, inside core: a TaskServer, or a Runner."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    @property
    def workers(self) -> int: ...

    def _attempt_started(self, attempt: Attempt, worker: str | None) -> None: ...

    def _attempt_over(
        self, attempt: Attempt, result: Any, error: BaseException | None, worker: str | None
    ) -> None: ...

    def _attempt_given_back(self, attempt: Attempt) -> None: ...

    def _lend(self, attempt: Attempt) -> None: ...

    def _reclaim(self, attempt: Attempt, wake: Callable[[], None]) -> None: ...

    @property
    def _supervision(self) -> Supervision: ...

    def _set_prefetch(self, slots: int) -> None: ...

    def _fail(self, error: BaseException, where: str) -> None: ...


class Attempt:
    """One attempt to run a task, and the handle its backend reports through (any thread).

    ``id`` is unique per server, ``number`` counts the task's attempts from 1 (an attempt given
    back unstarted does not count), ``payload`` is what :meth:`Backend.prepare` returned for the
    task, and ``slots`` is how many of the server's ``workers`` it holds until reported over.
    """

    __slots__ = (
        "_aborted",
        "_claimed",
        "_deadline",
        "_lent",
        "_over_gate",
        "_run_gate",
        "_server",
        "_start_gate",
        "_started_here",
        "_state",
        "_timer",
        "id",
        "number",
        "payload",
        "slots",
        "task",
    )

    def __init__(self, server: _Driver, task: Task, attempt_id: int, slots: int, payload: Any) -> None:
        self._server = server
        self._state = LAUNCHED
        self._aborted = False  # set by a Runner: a TaskServer finishes the task before it aborts
        self._start_gate = [LAUNCHED]
        self._over_gate = [LAUNCHED]
        self._claimed = False
        self._run_gate = [LAUNCHED]  # after claim(): started() pops it
        self._started_here = False
        self._lent = False
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.id = attempt_id
        self.task = task
        self.number = task.attempts + 1
        self.slots = slots
        self.payload = payload

    def __repr__(self) -> str:
        state = ("launched", "started", "withdrawn", "over")[self._state]
        return f"<Attempt {self.id} #{self.number} of {self.task!r} {state}>"

    @property
    def wanted(self) -> bool:
        """False once the server no longer wants this attempt's outcome (cancelled, timed out,
        withdrawn, stopping); a backend may skip work for it, but must still report it over."""
        return self._state in (LAUNCHED, STARTED) and not self._aborted and not self.task.done()

    def claim(self) -> bool:
        """Commit to starting the attempt soon; safe from any thread.

        For backends whose work starts far from the server: ask here before the work may
        start, and let it start only on True. From then on the attempt can no longer be
        withdrawn (``Future.cancel()`` returns False; ``Task.cancel()`` stops its work where the
        backend can cancel running work), so a cancel that returned True is never beaten by a
        start on a remote worker. The attempt is not running yet: report :meth:`started` when its
        work begins. Returns False if the attempt was withdrawn first: the work must not start.
        """
        try:
            self._start_gate.pop()  # atomic: a withdrawal in another thread pops it, or this does
        except IndexError:
            return self._claimed or self._state is STARTED
        self._claimed = True
        return True

    def started(self, worker: str | None = None) -> bool:
        """Report that the attempt's work began (``worker`` says where); safe from any thread.

        Returns False if the attempt was withdrawn first: then the work must not run (stop it if it
        already began elsewhere) and the attempt is to be reported over, e.g. with give_back().
        """
        try:
            # atomic: a withdrawal in another thread pops the start gate, or this does; once
            # claimed, only the run gate is left to pop
            (self._run_gate if self._claimed else self._start_gate).pop()
        except IndexError:
            return self._state is STARTED
        self._state = STARTED
        self._server._attempt_started(self, worker)
        return True

    def succeeded(self, result: Any, worker: str | None = None) -> None:
        """Report that the attempt ended and returned ``result``; safe from any thread."""
        try:
            self._over_gate.pop()  # atomic: the first report wins, later ones are ignored
        except IndexError:
            return
        self._server._attempt_over(self, result, None, worker)

    def failed(self, error: BaseException, worker: str | None = None) -> None:
        """Report that the attempt ended with ``error``; safe from any thread.

        The user's own exception goes here as itself; an :class:`~taskplex.errors.InfrastructureError`
        (a dead worker, a killed job) is retried within the task's ``retries``.
        """
        try:
            self._over_gate.pop()
        except IndexError:
            return
        self._server._attempt_over(self, None, error, worker)

    def give_back(self) -> None:
        """Report that the attempt never started (a worker died holding it, it was withdrawn).

        The task runs again later, and this does not count as one of its attempts. Giving back
        an attempt that did start is a backend error: the task then fails as if its worker died.
        """
        try:
            self._over_gate.pop()
        except IndexError:
            return
        self._server._attempt_given_back(self)

    @contextlib.contextmanager
    def _lending_slots(self) -> Iterator[None]:
        """While a thread running this attempt blocks waiting for other tasks, lend its slots."""
        server = self._server
        server._lend(self)
        try:
            yield
        finally:
            reclaimed = threading.Event()
            server._reclaim(self, reclaimed.set)
            reclaimed.wait()

    @contextlib.asynccontextmanager
    async def _lending_slots_async(self) -> AsyncIterator[None]:
        """While a coroutine running this attempt awaits other tasks, lend its slots."""
        server = self._server
        server._lend(self)
        try:
            yield
        finally:
            reclaimed = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not reclaimed.done():
                    reclaimed.set_result(None)

            server._reclaim(self, wake)
            await asyncio.shield(reclaimed)


class BackendContext:
    """What the server gives its backend at start: the loop, ``workers``, and supervised help.

    Valid from :meth:`Backend.start` until :meth:`Backend.stop` returns.
    """

    def __init__(self, server: _Driver) -> None:
        self._server = server

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs in; every Backend method is called on it."""
        loop = self._server.loop
        assert loop is not None
        return loop

    @property
    def workers(self) -> int:
        """How many attempts may execute at once."""
        return self._server.workers

    @property
    def name(self) -> str:
        """A short description of the server, for log messages and process titles."""
        return repr(self._server)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run a background loop (poll a scheduler, receive on sockets) owned by the server.

        It is cancelled after :meth:`Backend.stop`. If it raises, the server stops cleanly: every
        task not yet finished fails with a :class:`~taskplex.errors.BackendError` naming the loop
        and carrying the exception, and the error is logged; nothing reaches the caller's task group.
        (Under a :class:`~taskplex.runner.Runner`, every live attempt is reported over with it.)
        """
        return self._server._supervision.spawn(self.loop, coroutine, name)

    async def run_blocking(self, function: Callable[..., T], /, *args: Any, timeout: float) -> T:
        """Call a blocking ``function(*args)`` (sbatch, squeue, a spawn) off the event loop.

        Raises :class:`~taskplex.errors.BackendError` if it has not returned within ``timeout``
        seconds (the thread is left to finish on its own). Its own exceptions propagate.
        """
        return await self._server._supervision.run_blocking(function, args, timeout)

    def set_prefetch(self, slots: int) -> None:
        """Let the server launch attempts holding up to ``slots`` more than ``workers``.

        For backends that hand a worker its next tasks before the current one ends; the backend
        then makes sure that no more than ``workers`` slots' worth of work executes at once.
        Takes effect at once; a lower value as launched attempts end.
        """
        self._server._set_prefetch(slots)

    def fail(self, error: BaseException) -> None:
        """Say that the backend cannot go on: the server stops as if a background loop failed."""
        self._server._fail(error, "the backend")


class Backend(abc.ABC):
    """How a backend executes work; subclass it and implement :meth:`launch` and :meth:`abort`.

    Every method is called on the server's event loop, except :meth:`prepare`, which runs in the
    thread that submits the task. None may block; use :meth:`BackendContext.run_blocking`.
    """

    capabilities: Capabilities = Capabilities()
    """What this backend can do; a property where it depends on the backend's options."""

    async def start(self, context: BackendContext) -> None:  # noqa: B027 - optional hook
        """Bring workers up; raise to refuse starting (the server then stays stopped)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Bring workers down; called once per start, after every attempt was reported over.

        Nothing the backend or its tasks started may outlive this: processes, threads, jobs.
        """

    def prepare(self, task: Task) -> Any:
        """Check a task at submit and return its payload (e.g. the pickled call), or raise.

        Runs in the submitting thread. Raise a :class:`~taskplex.errors.TaskplexError` subclass
        (``SerializationError``, ``ResourceUnavailable``) to refuse the task with its message.
        """
        return None

    def slots(self, task: Task) -> int:
        """How many of the server's ``workers`` slots one attempt of ``task`` holds (its cores)."""
        return task.resources.cores

    @abc.abstractmethod
    def launch(self, attempts: Sequence[Attempt]) -> None:
        """Start these attempts without waiting for them; report each through its handle."""

    @abc.abstractmethod
    def abort(self, attempt: Attempt) -> None:
        """Withdraw ``attempt`` if it has not started, else stop its work where possible.

        Called at most once per attempt. The attempt must still be reported over afterwards.
        """

    def can_cancel_running(self, task: Task) -> bool:
        """Whether aborting a running attempt of ``task`` stops its work (default: capability).

        Called under the server's lock from any thread: answer from the task alone, quickly.
        """
        return self.capabilities.cancel_running


class CoroutineBackend(Backend):
    """A backend that runs each attempt as a coroutine: implement :meth:`execute`.

    Launching an attempt starts an asyncio task that reports it started, awaits ``execute`` and
    reports its result or exception; aborting cancels that task (``execute`` sees CancelledError).
    """

    def __init__(self) -> None:
        self._running: dict[int, asyncio.Task[None]] = {}

    @abc.abstractmethod
    async def execute(self, attempt: Attempt) -> Any:
        """Run one attempt and return its result, or raise the task's exception."""

    def launch(self, attempts: Sequence[Attempt]) -> None:
        loop = asyncio.get_running_loop()
        running = self._running
        for attempt in attempts:
            running[attempt.id] = loop.create_task(self._run(attempt))

    def abort(self, attempt: Attempt) -> None:
        running = self._running.get(attempt.id)
        if running is not None:
            running.cancel()

    def is_running(self, attempt: Attempt) -> bool:
        """Whether the coroutine of ``attempt`` has not ended yet."""
        return attempt.id in self._running

    async def _run(self, attempt: Attempt) -> None:
        try:
            if not attempt.started():
                attempt.give_back()
                return
            # this asyncio task runs in a context of its own: no need to reset it afterwards
            current_attempt.set(attempt)
            try:
                result = await self.execute(attempt)
            except asyncio.CancelledError:
                attempt.failed(TaskCancelled("its attempt was stopped"))
            except BaseException as exc:  # the task's own failure, SystemExit included
                attempt.failed(exc)
            else:
                attempt.succeeded(result)
        finally:
            self._running.pop(attempt.id, None)


def run_in_attempt(attempt: Attempt, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Call ``function(*args, **kwargs)`` as the work of ``attempt``, in this thread.

    For in-process backends: the call sees the caller's context variables as they were at launch
    (as :func:`asyncio.to_thread` does), and if it waits for other tasks of the same server, its
    slots are lent meanwhile, so that a task submitting tasks and waiting for them never deadlocks.
    """
    token = current_attempt.set(attempt)
    try:
        return function(*args, **kwargs)
    finally:
        current_attempt.reset(token)


def is_coroutine_function(function: Any) -> bool:
    """Whether calling ``function`` returns a coroutine: async functions, also behind partials,
    and objects whose ``__call__`` is one."""
    if type(function) is types.FunctionType:  # the common case, without inspect's unwrapping
        return bool(function.__code__.co_flags & inspect.CO_COROUTINE)
    while isinstance(function, functools.partial):
        function = function.func
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - async callable objects
    )
