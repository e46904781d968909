"""MPIServer: tasks run on MPI ranks, one rank each or several together (``resources.cores``).

Data flow, on the server's event loop except where marked::

    submit (caller's thread) ── prepare(): dumps_call pickles the call, or SerializationError
    TaskServer ── launch([attempt]) ──► waiting (FIFO) ──► to ranks with room (_dispatch):
                                         RUN to each of the task's ranks
                                         │ spawn mode: socket ─► spawn host ─► MPI (HostLink)
                                         │ world mode: RankLink thread ─► MPI
                                         ▼
                  worker ranks: STARTED; run the function; LOG records meanwhile; DONE
                                         │
    attempt.started / succeeded / failed ◄── _on_events(): rank 0's result, or the first exception

**Modes.** In spawn mode (a plain ``python``) the server starts a spawn host
(:mod:`taskplex_mpi.host`), which spawns ``workers`` ranks with ``MPI_Comm_spawn`` and relays;
they all exit at stop. In world mode (the program runs under
``mpiexec -n N python -m taskplex_mpi``) the server takes worker ranks of ``MPI_COMM_WORLD`` at
start and gives them back at stop. ``mode="auto"`` picks world mode when there is a world to use.

**Starting.** A task goes to a rank that is idle, or, while tasks are short, is sent ahead to a
busy one (``prefetch``). A task handed to idle ranks starts as they receive it and is reported
started then; one sent ahead is reported started when its rank says it began. Either way RUNNING
means the function is being called. A task waiting in the backend for ranks can be withdrawn.

**Stopping work.** MPI offers no way to interrupt a rank. So cancelling or timing out a running
task does not stop it: the task is delivered as cancelled or timed out at once, its ranks finish
the call and its result is discarded; until then they hold their slots. A multi-rank task whose
function raises on one rank fails at once with that exception; ranks still inside the function
(blocked on a message from the failed rank, say) stay busy, and get no new work, until they
return (or, in spawn mode, until the server stops and ends them after a bound).

**Dead ranks.** MPI ends every process of a job when one dies. In spawn mode that job is the
spawn host's and its ranks', not the caller's: the server sees the host end, fails the attempts
that had begun with WorkerLost (retried within their retries), gives back the others, and spawns
new ranks. Under mpiexec the job is the caller's own, and it ends.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from taskplex import (
    BackendUnavailable,
    Capabilities,
    InvalidOption,
    ResultUnreadable,
    Task,
    TaskServer,
    WorkerLost,
)
from taskplex.backend import Attempt, Backend, BackendContext
from taskplex.errors import ExceptionPayload, restore_exception
from taskplex.remote_logging import LevelWatch, emit_record, unpack_record
from taskplex.serialization import dumps_call, loads
from taskplex_mpi import world
from taskplex_mpi._hostlink import HostLink, describe_exit
from taskplex_mpi._link import RankLink, Received
from taskplex_mpi._protocol import CONFIGURE, DONE, LEVELS, LOG, RUN, SPAWN_REPLY_TAG, STARTED

__all__ = ["MODES", "MPIBackend", "MPIServer"]

logger = logging.getLogger("taskplex.mpi")

MODES = ("auto", "spawn", "world")
SPAWN_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
"""Seconds ranks get to answer STOP once their tasks are over."""
DEFAULT_PREFETCH = 32
"""The most tasks sent ahead to a busy rank, so that it need not wait for the server between
two short tasks."""
LONG_TASK = 5e-3
"""Seconds: when tasks take this long on average, none is sent ahead to a busy rank."""
AHEAD_WINDOW = 4e-3
"""Seconds of short tasks to send ahead: longer than a round trip between rank and server."""
JOB_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
"""Where mpiexec tells a process how many ranks its job has (MPICH, Open MPI)."""


@dataclass
class _Run:
    """An attempt handed to its ranks, until every one of them reported DONE."""

    attempt: Attempt
    ranks: tuple[int, ...]
    left: set[int] = field(default_factory=set)
    began: bool = False
    result: Any = None


def _where(ranks: tuple[int, ...]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


class MPIBackend(Backend):
    """Runs attempts on MPI ranks; see the module's docstring."""

    def __init__(
        self,
        *,
        mode: str = "auto",
        mpiexec: str | os.PathLike[str] | None = None,
        python: str | os.PathLike[str] | None = None,
        spawn_timeout: float = SPAWN_TIMEOUT,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        if mode not in MODES:
            raise InvalidOption(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mpiexec is not None and not isinstance(mpiexec, str | os.PathLike):
            raise InvalidOption(f"mpiexec must be a path (str), got {mpiexec!r}")
        if python is not None and not isinstance(python, str | os.PathLike):
            raise InvalidOption(f"python must be a path (str), got {python!r}")
        if isinstance(spawn_timeout, bool) or not isinstance(spawn_timeout, int | float):
            raise InvalidOption(f"spawn_timeout must be a number of seconds, got {spawn_timeout!r}")
        if not 0 < spawn_timeout < float("inf"):
            raise InvalidOption(f"spawn_timeout must be > 0 seconds, got {spawn_timeout!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise InvalidOption(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.mode = mode
        self.prefetch = prefetch
        self.mpiexec = None if mpiexec is None else os.fspath(mpiexec)
        self.python = os.fspath(python) if python is not None else sys.executable
        self.spawn_timeout = float(spawn_timeout)
        self._context: BackendContext | None = None
        self._link: RankLink | HostLink | None = None
        self._world_ranks: list[int] = []
        self._load: dict[int, int] = {}
        self._waiting: collections.deque[Attempt] = collections.deque()
        self._runs: dict[int, _Run] = {}
        self._levels = LevelWatch()
        self._mean_seconds = LONG_TASK
        """How long tasks took lately (a moving average), which sets how many are sent ahead."""

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        # a task sent ahead to a busy rank may begin before a cancel reaches it
        return Capabilities(
            remote=True,
            forwards_logs=True,
            resources=frozenset({"cores"}),
            withdraws_launched=self.prefetch == 0,
            # a dead rank ends its MPI job: in spawn mode that is the spawn host's, which is
            # replaced; under mpiexec it is the caller's own
            survives_worker_death=self.resolved_mode() == "spawn",
        )

    def resolved_mode(self) -> str:
        """The mode a server with these options runs in here (``auto`` resolved)."""
        if self.mode == "auto":
            return "world" if world.active() else "spawn"
        return self.mode

    # ------------------------------------------------------------------ bringing ranks up and down

    async def start(self, context: BackendContext) -> None:
        self._context = context
        self._load = {}
        self._mean_seconds = LONG_TASK
        self._levels = LevelWatch()
        if self.prefetch:
            context.set_prefetch(self.prefetch * context.workers)
        if self.resolved_mode() == "world":
            self._start_world(context)
        else:
            self._link = await self._start_host(context.workers)

    def _start_world(self, context: BackendContext) -> None:
        if not world.active():
            raise BackendUnavailable(
                "mode='world' needs the program to run under mpiexec: "
                "mpiexec -n N python -m taskplex_mpi script.py (or use mode='spawn')"
            )
        from mpi4py import MPI

        try:
            ranks, reply_tag = world.claim(context.workers)
        except ValueError as exc:
            raise BackendUnavailable(str(exc)) from None
        self._world_ranks = ranks
        loop = context.loop

        def deliver(received: Received) -> None:
            loop.call_soon_threadsafe(self._on_events, received)

        link = RankLink(MPI.COMM_WORLD, ranks, reply_tag, deliver, name="taskplex-mpi-world")
        self._configure(link, reply_tag)
        self._link = link

    async def _start_host(self, count: int) -> HostLink:
        job_size = max(int(os.environ.get(name, "1") or 1) for name in JOB_SIZE_VARIABLES)
        if job_size > 1:
            raise BackendUnavailable(
                f"this program is one of the {job_size} ranks of an mpiexec job, and every rank "
                "would spawn workers of its own: start it as "
                "mpiexec -n N python -m taskplex_mpi script.py to use the job's ranks as workers"
            )
        link = await HostLink.start(
            python=self.python, mpiexec=self.mpiexec, count=count, timeout=self.spawn_timeout
        )
        link.on_events = self._on_events
        link.ended.add_done_callback(functools.partial(self._host_ended, link))
        self._configure(link, SPAWN_REPLY_TAG)
        return link

    def _configure(self, link: RankLink | HostLink, reply_tag: int) -> None:
        self._load = dict.fromkeys(link.ranks, 0)
        configure = [(CONFIGURE, sys.path, self._levels.levels, reply_tag)]
        for rank in link.ranks:
            link.send(rank, configure)

    def _host_ended(self, link: HostLink, ended: asyncio.Future[int | None]) -> None:
        """The spawn host ended: if not told to, a rank died and MPI ended the job with it."""
        if link.closing or self._link is not link:
            return
        how = f"the MPI job of the worker ranks ended (its spawn host {describe_exit(ended.result())})"
        lost = WorkerLost(f"{how}: a rank died, and MPI ends every rank of a job then")
        self._link = None
        runs, self._runs = self._runs, {}
        for run in runs.values():
            if run.began:
                run.attempt.failed(lost, _where(run.ranks))
            else:
                run.attempt.give_back()
        logger.warning("%s; starting new ranks", how)
        assert self._context is not None
        self._context.spawn(self._replace_host(), name="taskplex-mpi-respawn")

    async def _replace_host(self) -> None:
        assert self._context is not None
        link = await self._start_host(self._context.workers)
        if self._context is None:  # the server stopped while the ranks started
            await link.close(STOP_TIMEOUT)
            return
        self._link = link
        self._dispatch()

    async def stop(self) -> None:
        link, self._link = self._link, None
        if isinstance(link, HostLink):
            if not await link.close(STOP_TIMEOUT):
                logger.error(
                    "worker ranks still ran a task %s s after stop, and were killed", STOP_TIMEOUT
                )
        elif link is not None:
            link.close(STOP_TIMEOUT)
            await asyncio.to_thread(link.ended.wait, STOP_TIMEOUT + 5)
            if link.unstopped:
                logger.error(
                    "worker rank(s) %s still run a task and could not be stopped: MPI cannot "
                    "interrupt a rank",
                    link.unstopped,
                )
            world.release([rank for rank in self._world_ranks if rank not in link.unstopped])
            self._world_ranks = []
        self._context = None

    # ------------------------------------------------------------------ tasks

    def prepare(self, task: Task) -> tuple[bytes, bytes]:
        if inspect.iscoroutinefunction(task.function):
            raise InvalidOption(
                f"{type(self).__name__} runs plain functions, and {task.function!r} is a coroutine "
                'function; use a backend that runs coroutines, e.g. taskplex.Executor("async")'
            )
        return dumps_call(task.function, task.args, task.kwargs)

    def launch(self, attempts: Sequence[Attempt]) -> None:
        self._waiting.extend(attempts)
        self._dispatch()

    def abort(self, attempt: Attempt) -> None:
        try:
            self._waiting.remove(attempt)
        except ValueError:
            return  # its ranks run it: MPI cannot stop them, and DONE reports it over
        attempt.give_back()

    def _dispatch(self) -> None:
        """Hand waiting attempts, first come first served, to ranks with room for them.

        A one-rank attempt goes to the least loaded rank that has fewer than ``1 + prefetch``
        attempts; one of k ranks waits until k ranks are idle. An attempt whose ranks are all idle
        starts as they receive it, so it is reported started here; a prefetched one is reported
        started when its rank says it began.
        """
        waiting, load, link = self._waiting, self._load, self._link
        if link is None:
            return  # new ranks are on their way
        levels = self._levels.changed()
        if levels is not None:
            for rank in link.ranks:
                link.send(rank, [(LEVELS, levels)])
        room = 1 + self._ahead()
        while waiting:
            attempt = waiting[0]
            count = attempt.slots
            if count == 1:
                rank = min(load, key=load.__getitem__)
                if load[rank] >= room:
                    return
                ranks: tuple[int, ...] = (rank,)
            else:
                idle = [rank for rank, busy in load.items() if not busy]
                if len(idle) < count:
                    return
                ranks = tuple(idle[:count])
            waiting.popleft()
            began = all(not load[rank] for rank in ranks)
            if began and not attempt.started(_where(ranks)):
                attempt.give_back()
                continue
            for rank in ranks:
                load[rank] += 1
            self._runs[attempt.id] = _Run(attempt, ranks, set(ranks), began=began)
            order = [(RUN, attempt.id, attempt.payload, ranks if count > 1 else None)]
            for rank in ranks:
                link.send(rank, order)

    def _on_events(self, received: Received) -> None:
        link = self._link
        if isinstance(link, RankLink) and link.failure is not None:
            assert self._context is not None
            self._context.fail(link.failure)
            return
        for rank, events in received:
            for event in events:
                kind = event[0]
                if kind == DONE:
                    self._done(rank, *event[1:])
                elif kind == STARTED:
                    self._started(*event[1:])
                elif kind == LOG:
                    try:
                        emit_record(unpack_record(event[1]))
                    except Exception:  # a handler or filter of the caller's; the task goes on
                        logger.exception("a log record from rank %s could not be re-emitted", rank)
        if self._waiting:
            self._dispatch()

    def _ahead(self) -> int:
        """How many tasks to send ahead to a busy rank: enough to cover a round trip to the
        server when tasks are short, none when they are long (so that they spread evenly)."""
        mean = self._mean_seconds
        if mean >= LONG_TASK:
            return 0
        return min(self.prefetch, max(1, int(AHEAD_WINDOW / max(mean, 1e-6))))

    def _started(self, attempt_id: int, where: str) -> None:
        run = self._runs.get(attempt_id)
        if run is None or run.began:
            return
        run.began = True
        if not run.attempt.started(where):
            # stopping withdrew it while its rank took it up: the call runs, its outcome is dropped
            run.attempt.give_back()

    def _done(self, rank: int, attempt_id: int, failed: bool, data: bytes, seconds: float) -> None:
        run = self._runs.get(attempt_id)
        if run is None:
            return
        self._mean_seconds += (seconds - self._mean_seconds) * 0.2
        run.left.discard(rank)
        self._load[rank] -= 1
        attempt, where = run.attempt, f"rank {rank}"
        if failed or rank == run.ranks[0]:
            try:
                value = loads(data)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # even SystemExit from a __reduce__ fails only this task
                what = "exception" if failed else "result"
                attempt.failed(
                    ResultUnreadable(
                        f"the {what} of {attempt.task!r} from worker {where} cannot be unpickled "
                        f"here: {type(exc).__name__}: {exc}"
                    ),
                    where,
                )
            else:
                if not failed:
                    run.result = value
                elif isinstance(value, ExceptionPayload):
                    attempt.failed(restore_exception(value), where)  # the first one wins
                else:
                    attempt.failed(ResultUnreadable(f"worker {where} sent {value!r} as an exception"))
        if not run.left:
            del self._runs[attempt_id]
            attempt.succeeded(run.result, f"rank {run.ranks[0]}")  # ignored if it failed before


class MPIServer(TaskServer):
    """A server whose tasks run on MPI ranks (mpi4py).

    Options: ``workers`` (ranks; in world mode default all free worker ranks, in spawn mode one
    per CPU this process may use), ``queue_size``, ``mode`` (``"auto"``, ``"spawn"``,
    ``"world"``), ``mpiexec`` (spawn mode: the launcher of the MPI mpi4py uses; default the one
    beside this interpreter, else the first on PATH), ``python`` (spawn mode: the interpreter the
    ranks run; default this one) and ``spawn_timeout`` (seconds the spawn may take).
    """

    backend_class = MPIBackend

    def __init__(
        self,
        *,
        workers: int | None = None,
        queue_size: int = 0,
        mode: str = "auto",
        mpiexec: str | os.PathLike[str] | None = None,
        python: str | os.PathLike[str] | None = None,
        spawn_timeout: float = SPAWN_TIMEOUT,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        backend = MPIBackend(
            mode=mode, mpiexec=mpiexec, python=python, spawn_timeout=spawn_timeout, prefetch=prefetch
        )
        if workers is None:
            workers = _default_workers(backend.resolved_mode())
        super().__init__(backend, workers=workers, queue_size=queue_size)


def _default_workers(mode: str) -> int:
    if mode == "world":
        return max(world.free_ranks(), 1)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
