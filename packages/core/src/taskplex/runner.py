"""Runner: one backend, driven by a program that does its own scheduling.

A :class:`~taskplex.scheduler.TaskServer` owns every rule of running tasks. Some programs have
made all those decisions elsewhere already: the zmq worker host, say, runs what a broker and its
clients have scheduled, retried and timed, and needs from its mp backend only the mechanism —
processes that run calls, are watched, and can be killed. A :class:`Runner` gives it that: it
brings a backend up, launches an attempt of each task it is handed at once, aborts the attempts it
is told to, and passes on what the backend reports, through the same handles a TaskServer uses::

    program ── start() ─────────► Runner ── start(context) ──────────────► Backend
            ── launch(task) ────►        ── prepare(task), launch([attempt]) ──►
            ── abort(attempt) ──►        ── abort(attempt) ───────────────────►
            ── stop() ──────────►        ── abort(each live attempt), stop() ─►
                                                                         │
            ◄── on_started(attempt, worker) ◄── attempt.started() ───────┤
            ◄── on_over(attempt, result, error, worker) ◄── succeeded() ─┤ or failed()
            ◄── on_given_back(attempt) ◄── attempt.give_back() ──────────┘ it never ran

**No policy.** A Runner has no queue, no timeouts, retries, dependencies, names, hooks or
statistics, and leaves the :class:`~taskplex.task.Task` record alone (its status stays PENDING):
a task is only the backend's description of a call. Every attempt goes to the backend at once and
slots are not counted; keep at most ``workers`` slots' worth of attempts launched, plus
:attr:`Runner.prefetch`, unless the backend queues them itself (the mp backend does: it runs
``workers`` at a time and holds the rest). An attempt given back never ran: launch its task again
if it is still wanted. An :class:`~taskplex.errors.InfrastructureError` in ``on_over`` is the
caller's to retry or not.

**Callbacks** run on the runner's event loop, one per report: ``on_over`` or ``on_given_back``
exactly once per attempt, ``on_started`` at most once and before it (an outcome may come without
a start: a backend that reports only outcomes, or an attempt that failed before it began). They
never run inside :meth:`Runner.launch`: what a backend reports while it launches arrives on the
next turn of the loop, so the caller may record the attempts launch returns first. They may run
inside :meth:`Runner.abort` and :meth:`Runner.stop`. An exception a callback raises is logged.

**Aborting** an attempt that has not started withdraws it (``on_given_back``); a started one is
stopped where the backend can (``cancel_running``) and reported over with what the backend says
(for the mp backend, a :class:`~taskplex.errors.TaskCancelled`).

**A backend failure** — one of its supervised loops raising, or :meth:`BackendContext.fail
<taskplex.backend.BackendContext.fail>` — is the caller's to see: :attr:`Runner.failure` is set
to a :class:`~taskplex.errors.BackendError` that carries it, every live attempt is reported over
at once with that error (later reports from the backend are ignored), and :meth:`Runner.launch`
raises it from then on. :meth:`Runner.stop` still has to be called to bring the backend down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from taskplex._supervision import Supervision, backend_failure
from taskplex.backend import LAUNCHED, OVER, STARTED, WITHDRAWN, Attempt, Backend, BackendContext
from taskplex.errors import BackendError, InvalidOption, ServerNotRunning
from taskplex.scheduler import ABORT_GRACE, STOP_TIMEOUT, _shielded, check_int

if TYPE_CHECKING:
    from taskplex.task import Task

__all__ = ["Runner"]

logger = logging.getLogger("taskplex.runner")


_NEW, _STARTING, _RUNNING, _STOPPING, _STOPPED = "new", "starting", "running", "stopping", "stopped"


def _close_start_gate(attempt: Attempt) -> bool:
    """Keep ``attempt`` from starting from now on; False if it had started (or was kept) first."""
    try:
        attempt._start_gate.pop()  # atomic: a start in another thread pops it, or this does
    except IndexError:
        return False
    return True


class Runner:
    """Drive ``backend`` with ``workers`` slots for a program that schedules by itself.

    ``on_started(attempt, worker)``, ``on_over(attempt, result, error, worker)`` (``error`` is
    None when the attempt succeeded) and ``on_given_back(attempt)`` receive the backend's reports;
    see the module docstring for when. Every method is called on the loop :meth:`start` ran in.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        workers: int,
        on_over: Callable[[Attempt, Any, BaseException | None, str | None], object],
        on_given_back: Callable[[Attempt], object],
        on_started: Callable[[Attempt, str | None], object] | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidOption(f"a Runner needs a taskplex.backend.Backend, got {backend!r}")
        self.backend = backend
        self.workers = check_int("workers", workers, 1)
        self.failure: BackendError | None = None
        """Why the backend cannot go on (see the module docstring), or None."""
        self._report_started = on_started
        self._report_over = on_over
        self._report_given_back = on_given_back
        # the defaults need no call per task
        self._prepare = None if type(backend).prepare is Backend.prepare else backend.prepare
        self._slots_of = None if type(backend).slots is Backend.slots else backend.slots
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._live: dict[int, Attempt] = {}
        self._attempt_ids = itertools.count(1)
        self._launching = False
        self._prefetch = 0
        self._drained: asyncio.Event | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._supervision = Supervision(self._fail)

    def __repr__(self) -> str:
        return f"<Runner of {type(self.backend).__name__} workers={self.workers} {self._state}>"

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the runner was started in."""
        return self._loop

    @property
    def prefetch(self) -> int:
        """Slots' worth of attempts the backend asks to be handed beyond ``workers``
        (:meth:`BackendContext.set_prefetch <taskplex.backend.BackendContext.set_prefetch>`)."""
        return self._prefetch

    @property
    def live(self) -> int:
        """How many attempts were launched and not reported over yet."""
        return len(self._live)

    def is_running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`, unless the backend failed."""
        return self._state == _RUNNING and self.failure is None

    # ================================================================== the caller's API

    async def start(self) -> None:
        """Start the backend; raise what it raised if it cannot start (the runner stays stopped)."""
        if self._state in (_STARTING, _RUNNING, _STOPPING):
            raise RuntimeError(f"{self!r} is already running; stop it before starting it again")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._stopped = loop.create_future()
        self.failure = None
        self._prefetch = 0
        self._state = _STARTING
        try:
            await self.backend.start(BackendContext(self))
        except BaseException:
            await _shielded(self._close())
            raise
        if self.failure is not None:  # a loop it spawned failed at once
            await _shielded(self._stop_everything())
            raise self.failure
        self._state = _RUNNING

    def launch(self, task: Task) -> Attempt:
        """Launch an attempt of ``task`` and return its handle; see :meth:`launch_many`."""
        return self.launch_many((task,))[0]

    def launch_many(self, tasks: Iterable[Task]) -> list[Attempt]:
        """Launch one attempt of each task, in one batch, and return their handles in order.

        Each task is checked with the backend's ``prepare`` first; if one is refused, its error
        (a :class:`~taskplex.errors.TaskplexError`) is raised and none of them is launched.
        Raises :attr:`failure` after a backend failure, ServerNotRunning when not running.
        """
        if self._state != _RUNNING or self.failure is not None:
            raise self.failure or ServerNotRunning(f"{self!r} is not running; await start() first")
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(f"launch attempts on the event loop thread of {self!r}")
        prepare, slots_of, ids = self._prepare, self._slots_of, self._attempt_ids
        attempts = [
            Attempt(
                self,
                task,
                next(ids),
                task.resources.cores if slots_of is None else slots_of(task),
                None if prepare is None else prepare(task),
            )
            for task in tasks
        ]
        live = self._live
        for attempt in attempts:
            live[attempt.id] = attempt
        self._launching = True
        try:
            self.backend.launch(attempts)
        except Exception as exc:
            name = type(self.backend).__name__
            logger.exception("%s.launch() failed", name)
            error = BackendError(f"{name}.launch() failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            for attempt in attempts:
                attempt.failed(error)
        finally:
            self._launching = False
        return attempts

    def abort(self, attempt: Attempt) -> None:
        """Withdraw ``attempt`` if it has not started, else stop its work where the backend can.

        It is then reported over as usual (``on_given_back`` if it never ran). Aborting an
        attempt that is over, or again, does nothing.
        """
        if attempt._server is not self:
            raise ValueError(f"{attempt!r} was not launched by {self!r}")
        if attempt._aborted or attempt._state is OVER or attempt.id not in self._live:
            return
        attempt._aborted = True
        if _close_start_gate(attempt):
            attempt._state = WITHDRAWN
        try:
            self.backend.abort(attempt)
        except Exception as exc:
            # the backend lost track of it: count it over, so that nothing waits for it forever
            name = type(self.backend).__name__
            logger.exception("%s.abort() failed for %r", name, attempt)
            attempt.failed(BackendError(f"{name}.abort() failed: {exc}"))

    async def stop(self) -> None:
        """Abort every live attempt, wait until each is reported over, and stop the backend.

        Attempts a backend that can stop work (``cancel_running``) has not reported over within
        ``taskplex.scheduler.ABORT_GRACE`` seconds are reported over with a BackendError. Safe
        to call more than once; the runner may be started again afterwards.
        """
        if self._state in (_NEW, _STOPPED):
            return
        stopped = self._stopped
        assert stopped is not None
        if self._state != _STOPPING:
            self._state = _STOPPING
            await _shielded(self._stop_everything())
        await asyncio.shield(stopped)

    # ================================================================== stopping

    async def _stop_everything(self) -> None:
        self._state = _STOPPING
        try:
            for attempt in list(self._live.values()):
                self.abort(attempt)
            await self._wait_for_live()
            try:
                await asyncio.wait_for(self.backend.stop(), STOP_TIMEOUT)
            except Exception as exc:
                name = type(self.backend).__name__
                what = "hung" if isinstance(exc, TimeoutError) else f"failed: {exc}"
                logger.error("%s.stop() %s", name, what, exc_info=exc)
                if self.failure is None:
                    self.failure = BackendError(f"{name}.stop() {what}")
                    self.failure.__cause__ = exc
        finally:
            await self._close()

    async def _wait_for_live(self) -> None:
        if self._live:
            # work that cannot be stopped (a thread) is waited for; work that can, for a while
            bound = ABORT_GRACE if self.backend.capabilities.cancel_running else None
            self._drained = drained = asyncio.Event()
            try:
                await asyncio.wait_for(drained.wait(), bound)
            except TimeoutError:
                logger.error(
                    "%s did not report %d aborted attempt(s) over within %s s: %s",
                    type(self.backend).__name__,
                    len(self._live),
                    bound,
                    list(self._live.values())[:5],
                )
            finally:
                self._drained = None
        self._end_live(
            lambda attempt: BackendError(
                f"{type(self.backend).__name__} never reported {attempt!r} over after it was aborted"
            )
        )

    def _end_live(self, error_for: Callable[[Attempt], BaseException]) -> None:
        """Report every live attempt over now, with ``error_for(attempt)``; the backend's own
        reports of them come too late and are ignored."""
        for attempt in list(self._live.values()):
            try:
                attempt._over_gate.pop()
            except IndexError:
                continue  # its report is on its way to the loop
            _close_start_gate(attempt)
            attempt._state = OVER
            self._over(attempt, None, error_for(attempt), None)

    async def _close(self) -> None:
        await self._supervision.close()
        self._state = _STOPPED
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # ================================================================== reports (see backend.Attempt)

    def _attempt_started(self, attempt: Attempt, worker: str | None) -> None:
        if threading.get_ident() == self._loop_thread and not self._launching:
            self._started(attempt, worker)
        else:
            self._later(self._started, attempt, worker)

    def _attempt_over(
        self, attempt: Attempt, result: Any, error: BaseException | None, worker: str | None
    ) -> None:
        if attempt._state is LAUNCHED:
            _close_start_gate(attempt)  # it can never start now
        attempt._state = OVER
        if threading.get_ident() == self._loop_thread and not self._launching:
            self._over(attempt, result, error, worker)
        else:
            self._later(self._over, attempt, result, error, worker)

    def _attempt_given_back(self, attempt: Attempt) -> None:
        state = attempt._state
        if state is LAUNCHED and not _close_start_gate(attempt):
            state = attempt._state  # it started meanwhile, in another thread
        attempt._state = OVER
        if state is STARTED:
            name = type(self.backend).__name__
            error = BackendError(f"{name} gave back {attempt!r}, which had started")
            self._later(self._over, attempt, None, error, None)
        elif threading.get_ident() == self._loop_thread and not self._launching:
            self._given_back(attempt)
        else:
            self._later(self._given_back, attempt)

    def _later(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(callback, *args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: the runner is long gone
                loop.call_soon_threadsafe(callback, *args)

    def _started(self, attempt: Attempt, worker: str | None) -> None:
        if attempt._started_here or attempt.id not in self._live:
            return  # told already, or over before this report got here
        attempt._started_here = True
        report = self._report_started
        if report is not None:
            try:
                report(attempt, worker)
            except Exception:
                logger.exception("on_started of %r failed for %r", self, attempt)

    def _over(
        self, attempt: Attempt, result: Any, error: BaseException | None, worker: str | None
    ) -> None:
        live = self._live
        if live.pop(attempt.id, None) is None:
            return
        try:
            self._report_over(attempt, result, error, worker)
        except Exception:
            logger.exception("on_over of %r failed for %r", self, attempt)
        if not live and self._drained is not None:
            self._drained.set()

    def _given_back(self, attempt: Attempt) -> None:
        live = self._live
        if live.pop(attempt.id, None) is None:
            return
        try:
            self._report_given_back(attempt)
        except Exception:
            logger.exception("on_given_back of %r failed for %r", self, attempt)
        if not live and self._drained is not None:
            self._drained.set()

    # Slots are not counted here: a task that waits for others holds nothing to lend.

    def _lend(self, attempt: Attempt) -> None:
        pass

    def _reclaim(self, attempt: Attempt, wake: Callable[[], None]) -> None:
        wake()

    # ================================================================== the backend's context

    def _set_prefetch(self, slots: int) -> None:
        self._prefetch = check_int("prefetch", slots, 0)

    def _fail(self, error: BaseException, where: str) -> None:
        """The backend cannot go on: fail every live attempt with the reason, refuse new ones."""
        if self.failure is not None or self._state not in (_STARTING, _RUNNING, _STOPPING):
            return
        self.failure = backend_failure(logger, repr(self), error, where)
        self._later(self._fail_live)

    def _fail_live(self) -> None:
        failure = self.failure
        assert failure is not None
        aborting = [attempt for attempt in self._live.values() if not attempt._aborted]
        self._end_live(lambda attempt: failure)
        # stop what still runs, as far as a failed backend can; its reports are ignored now
        for attempt in aborting:
            attempt._aborted = True
            try:
                self.backend.abort(attempt)
            except Exception:
                logger.debug("%s.abort() failed for %r", type(self.backend).__name__, attempt)
