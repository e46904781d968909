"""HPCServer: every attempt runs as a batch job on a Slurm cluster, submitted through pysqa.

Data flow, on the server's event loop unless marked (thread) — blocking work runs through
``context.run_blocking``, each call bounded::

    submit (caller's thread) ── prepare(): pickles the call; checks cores, memory and walltime
                                against the queue's limits (ResourceUnavailable, never clamped)
    TaskServer ── launch([attempt]) ──► submit loop ─(thread)─► write <attempt>/call; sbatch
                                                                    │ (pysqa)
                                                                    ▼
                        the job: python -m taskplex_hpc.job <attempt> ── writes started
    poll loop, every ``interval`` s:                                │
      (thread) one squeue for all of this server's jobs             │
      (thread) scan the attempt directories ◄───────────────────────┘
      started ─► attempt.started()? ─ True ─► write go ─► the job runs the function,
                                     └ False ─► scancel         writes result (and log frames)
      result  ─► attempt.succeeded / failed (the task's exception, remote traceback chained)
      gone from squeue without a result ─(thread)─► scontrol show job / sacct -c: the reason
               ─► attempt.failed(JobKilled / WorkerLost / ResultUnreadable, retried by cause)
    abort(attempt) ─► withdrawn before sbatch: given back; else scancel, reported once gone
    stop() ─► scancel every job of this server still queued, wait until squeue shows none,
              remove the run directory

At start, a server also looks for the run directories of servers in the same ``workdir`` that
died (:mod:`taskplex_hpc.adoption`): a task with a key (a journal's) whose job finished while
its client was dead gets that result without a new job, and one whose job still runs is taken
over; the rest of such runs is cancelled and removed.

A job that has started waits for ``go`` before it runs anything, so a task cancelled while its
job was pending or starting never runs (``withdraws_launched``). The work of a running task is
stopped (``cancel_running``, ``timeout_kills_work``) by the job's guard as soon as the server
writes ``abort``, by a direct kill where the job runs on this very host, and by ``scancel``; an
attempt keeps its slots until its job has left the queue.

With ``pack=True`` attempts get no job each: their calls are written as before and a ticket per
attempt goes into a queue directory per task shape, from which pilot jobs
(:mod:`taskplex_hpc.pilot`) claim them; the go, abort and result files are the same, and the
server starts pilots where the live tasks of a shape need more than are queued. Tickets are
dropped for ``workers`` slots more than run (``prefetch``), so a pilot's slot that frees claims
its next task at once; an unclaimed ticket is withdrawn by unlinking it, which fails only if a
pilot renamed it first. Between two polls the server looks at the attempts' files alone, as often
as every ``LOOK`` while tasks come and go, so that a claimed task gets its go without waiting for
the next squeue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskplex import (
    BackendError,
    BackendUnavailable,
    Capabilities,
    InvalidOption,
    ResourceUnavailable,
    ResultUnreadable,
    Task,
    TaskCancelled,
    TaskServer,
    WorkerLost,
)
from taskplex.backend import Attempt, Backend, BackendContext
from taskplex.errors import ExceptionPayload, restore_exception
from taskplex.remote_logging import emit_record, logger_levels, unpack_record
from taskplex.serialization import dumps_call, loads
from taskplex_hpc import adoption, files
from taskplex_hpc.cluster import (
    Cluster,
    JobEnd,
    JobSpec,
    QueueLimits,
    SchedulerCommandError,
    SubmitFailed,
)
from taskplex_hpc.errors import error_for, no_record
from taskplex_hpc.options import DEFAULT_TEMPLATE, Options

__all__ = ["HPCBackend", "HPCServer"]

logger = logging.getLogger("taskplex.hpc")

STOP_BOUND = 30.0
"""Seconds stop() waits for this server's cancelled jobs to leave the queue."""
SUBMIT_RETRY = 2.0
"""Seconds before a submission that failed for a passing reason (no controller) is tried again."""
LOOK = 0.01
"""Packed: the shortest pause between looks at the attempts' files while tasks come and go."""


@dataclass(eq=False)
class _Job:
    """One attempt on its way through the batch system."""

    attempt: Attempt
    directory: Path
    log_levels: dict[str, int]
    job_id: int | None = None
    """The job of its own (one job per task), once submitted."""
    shape: str = ""
    """Packed: the ticket directory of the pilots sized for it."""
    ticket: Path | None = None
    """Packed: its ticket, once dropped for the pilots."""
    pilot: int | None = None
    """Packed: the pilot job that claimed it."""
    where: tuple[int, str] | None = None
    """The pid and host of the process that runs the attempt, once it said it is ready."""
    began: bool = False
    """The job said it is ready, and the attempt was allowed to start."""
    aborted: bool = False
    gone_since: float | None = None
    """When the job was first seen gone from the queue without a result."""
    adopted: bool = False
    """Its job was submitted by a server that died, and taken over (see adoption)."""
    log: files.LogReader = field(init=False)

    def __post_init__(self) -> None:
        self.log = files.LogReader(self.directory / files.LOG)


@dataclass
class _Scan:
    """What one look at an attempt's directory found (read in a thread)."""

    started: str | None = None
    result: bytes | BaseException | None = None
    exit: str | None = None
    """Packed: how the attempt's process in its pilot ended without a result."""
    log: list[bytes] = field(default_factory=list)
    output: str = ""


class HPCBackend(Backend):
    """Run each attempt as a Slurm batch job; see :class:`HPCServer` for the options."""

    capabilities = Capabilities(
        cancel_running=True,
        timeout_kills_work=True,
        withdraws_launched=True,
        survives_worker_death=True,
        remote=True,
        forwards_logs=True,
        resources=frozenset({"cores", "gpus", "memory", "walltime"}),
    )

    def __init__(self, options: Options) -> None:
        self.options = options
        try:
            self.cluster = Cluster(
                queue_type=options.queue_type,
                template=options.template or DEFAULT_TEMPLATE,
                config_path=options.config_path,
                cluster=options.cluster,
                queue=options.queue,
                command_timeout=options.command_timeout,
            )
        except (ValueError, KeyError, OSError) as exc:
            raise InvalidOption(f"the pysqa configuration cannot be used: {exc}") from exc
        except Exception as exc:  # a template that is not valid Jinja, a broken queue.yaml
            raise InvalidOption(
                f"the submission template or pysqa configuration is invalid: {type(exc).__name__}: {exc}"
            ) from exc
        self._context: BackendContext | None = None
        self._limits: QueueLimits | None = None
        self._run_directory: Path | None = None
        self._lock: int | None = None
        """The lock of the run directory, held while the server lives (see adoption)."""
        self._stale: list[adoption.Stale] = []
        """Run directories of dead servers taken over: removed at stop."""
        self._adopted: dict[str, adoption.Adopted] = {}
        """Task key -> a dead server's attempt of it that finished or still runs."""
        self._sys_path: list[str] = []
        self._jobs: dict[int, _Job] = {}
        """Attempt id -> job, for every attempt not yet reported over."""
        self._to_submit: collections.deque[_Job] = collections.deque()
        self._submitting: _Job | None = None
        self._submit_wake = asyncio.Event()
        self._to_cancel: set[int] = set()
        self._submitted: set[int] = set()
        """Job ids of this run not yet seen gone from the queue (stop cancels what is left)."""
        self._gone: set[int] = set()
        """Job ids of this run seen gone from the queue, whose attempts are not all reported."""
        self._finished: dict[int, Path] = {}
        """Reported jobs still in the queue: their directories are removed once they are gone."""
        self._unreachable_since: float | None = None
        self._pilots: dict[int, str] = {}
        """Packed: the pilot jobs of this run not yet seen gone, and the shape each serves."""
        self._pilot_count = 0
        self._host = socket.gethostname()
        self.polls = 0
        """How many times the server looked at the queue (one squeue call each)."""

    @property
    def _silence(self) -> float:
        """Seconds without a heartbeat after which a job waiting for its go gives up."""
        return max(120.0, 20 * self.options.interval + 4 * self.options.command_timeout)

    @property
    def scheduler_calls(self) -> dict[str, int]:
        """How many times each scheduler command ran so far (sbatch, squeue, scontrol, ...)."""
        return self.cluster.calls

    # ------------------------------------------------------------------ bring-up and down

    async def start(self, context: BackendContext) -> None:
        options = self.options
        try:
            self._limits = await context.run_blocking(
                self.cluster.limits, timeout=2 * options.command_timeout + 5
            )
        except (SchedulerCommandError, BackendError) as exc:
            raise BackendUnavailable(f"Slurm cannot be reached: {exc}") from exc
        except ValueError as exc:
            raise InvalidOption(str(exc)) from exc
        host = socket.gethostname().split(".")[0]
        name = f"taskplex-{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self._run_directory = await context.run_blocking(
            files.make_private_directory, options.workdir / name, timeout=options.command_timeout
        )
        files.touch(self._run_directory / files.ALIVE)
        self._lock = adoption.hold_lock(self._run_directory)
        self._context = context
        try:
            await context.run_blocking(self._adopt, timeout=2 * options.command_timeout + 10)
        except (SchedulerCommandError, BackendError, OSError) as exc:
            logger.warning(
                "the runs of servers that died in %s were not taken over: %s", options.workdir, exc
            )
        prefetch = self.options.prefetch
        if prefetch is None:
            # packed: a ticket waits for each slot, so that a pilot's slot that frees takes its
            # next task at once instead of after a round trip through the server
            prefetch = context.workers if self.options.pack else 0
        if prefetch:
            context.set_prefetch(prefetch)
        # the caller's modules (its script's directory, test directories) are found in jobs too
        self._sys_path = list(sys.path)
        self._submit_wake = asyncio.Event()
        context.spawn(self._submit_loop(), name="hpc-submit")
        context.spawn(self._poll_loop(), name="hpc-poll")

    def _adopt(self) -> None:
        """Take over the runs of servers that died in the same workdir (thread; see adoption)."""
        assert self._run_directory is not None
        self._stale = adoption.find_stale(self.options.workdir, self._run_directory)
        if not self._stale:
            return
        adopted, cancel = adoption.collect(self._stale, self.cluster.working_directories())
        if cancel:
            self.cluster.cancel(cancel)
        running = [c.job_id for c in adopted.values() if c.job_id is not None]
        self._submitted.update(running)  # cancelled at stop unless a task claims them first
        self._adopted = adopted
        logger.info(
            "took over %d run(s) of servers that died: %d finished task(s) to collect, %d job(s) "
            "still running, %d job(s) cancelled",
            len(self._stale), len(adopted) - len(running), len(running), len(cancel),
        )  # fmt: skip

    async def stop(self) -> None:
        context, self._context = self._context, None
        if context is None:
            return
        run_directory = self._run_directory
        leftover = sorted(self._submitted)
        stale, self._stale = self._stale, []
        try:
            await context.run_blocking(
                self._cancel_everything,
                leftover,
                [run.directory for run in stale],
                timeout=STOP_BOUND + 10,
            )
        except BackendError as exc:
            logger.error("jobs of this server may be left in the queue: %s", exc)
        if run_directory is not None:
            directories = [run_directory, *(run.directory for run in stale)]
            await context.run_blocking(_remove_directories, directories, timeout=STOP_BOUND)
        adoption.release(stale)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        self._adopted.clear()
        # a server started again begins afresh: new run directory, no jobs, no pilots
        self._jobs.clear()
        self._to_submit.clear()
        self._submitted.clear()
        self._gone.clear()
        self._finished.clear()
        self._to_cancel.clear()
        self._pilots.clear()
        self._run_directory = None

    def _cancel_everything(self, job_ids: list[int], others: list[Path]) -> None:
        """Cancel these jobs and any other job running in this server's directory or in
        ``others`` (dead servers' runs taken over); wait until none is in the queue (thread)."""
        prefixes = tuple(f"{directory}{os.sep}" for directory in [self._run_directory, *others])
        deadline = time.monotonic() + STOP_BOUND
        cancelled: set[int] = set()
        while True:
            try:
                frame = self.cluster.adapter.get_queue_status()
                if frame is None:
                    raise SchedulerCommandError("pysqa returned no queue status")
            except SchedulerCommandError as exc:
                if time.monotonic() > deadline:
                    raise
                logger.warning("stopping: the queue cannot be read (%s); trying again", exc)
                time.sleep(1.0)
                continue
            ours = {
                int(job_id)
                for job_id, directory in zip(frame["jobid"], frame["working_directory"], strict=True)
                if int(job_id) in job_ids or f"{directory}{os.sep}".startswith(prefixes)
            }
            if not ours:
                return
            if time.monotonic() > deadline:
                raise SchedulerCommandError(f"jobs {sorted(ours)} are still in the queue")
            uncancelled = sorted(ours - cancelled)
            if uncancelled:
                with contextlib.suppress(SchedulerCommandError):
                    self.cluster.cancel(uncancelled)
                    cancelled.update(uncancelled)
            time.sleep(0.2)

    # ------------------------------------------------------------------ submit

    def prepare(self, task: Task) -> tuple[bytes, bytes]:
        if asyncio.iscoroutinefunction(task.function):
            raise InvalidOption(
                f"{type(self).__name__} runs plain functions, and {task.function!r} is a coroutine "
                'function; use a backend that runs coroutines, e.g. taskplex.Executor("async")'
            )
        if self.options.pack and self._need(task) > self.options.pilot_walltime - files.DRAIN_MARGIN:
            raise ResourceUnavailable(
                f"{task!r} may run {self._need(task):g} s, more than a pilot job has "
                f"(pilot_walltime={self.options.pilot_walltime:g} s, less {files.DRAIN_MARGIN:g} s "
                "to drain); raise pilot_walltime"
            )
        limits = self._limits
        if limits is not None:
            cores, memory, walltime = self._request(task)
            problems = limits.problems(cores, memory, walltime)
            if problems:
                raise ResourceUnavailable(
                    f"{task!r} cannot run in {limits.source}: {'; '.join(problems)}"
                )
        return dumps_call(task.function, task.args, task.kwargs)

    def slots(self, task: Task) -> int:
        return max(self.options.cores, task.resources.cores)

    def _request(self, task: Task) -> tuple[int, int | None, float | None]:
        resources = task.resources
        options = self.options
        memory = resources.memory if resources.memory is not None else options.memory
        walltime = resources.walltime if resources.walltime is not None else options.walltime
        return max(options.cores, resources.cores), memory, walltime

    def launch(self, attempts: Sequence[Attempt]) -> None:
        run_directory = self._run_directory
        assert run_directory is not None, "launch() runs only between start() and stop()"
        # the caller's levels as they are now: a level lowered while the server runs applies
        levels = logger_levels()
        for attempt in attempts:
            key = attempt.task.key
            if key is not None and key in self._adopted:
                self._take_over(attempt, self._adopted.pop(key), levels)
                continue
            job = _Job(attempt, run_directory / str(attempt.id), levels)
            if self.options.pack:
                job.shape = self._shape(attempt.task)
            self._jobs[attempt.id] = job
            self._to_submit.append(job)
        self._submit_wake.set()

    def _take_over(self, attempt: Attempt, found: adoption.Adopted, levels: dict[str, int]) -> None:
        """Run ``attempt`` as the attempt of a dead server that ``found`` describes: deliver its
        result at once, or watch its job that still runs."""
        job = _Job(attempt, found.directory, levels, adopted=True)
        pid, host, holder = ([*found.started.split(), "?", "?", "?"])[:3]
        if pid.isdigit():
            job.where = (int(pid), host)
        self._jobs[attempt.id] = job
        if found.result is None:
            job.job_id = found.job_id  # watched by the poll loop as if submitted here
            return
        where = f"job {holder} of a server that died, collected from {found.directory}"
        if attempt.started(where):
            self._report(job, found.result, "", where)
        else:  # withdrawn meanwhile
            self._forget(job)
            attempt.give_back()

    def _shape(self, task: Task) -> str:
        cores, memory, _ = self._request(task)
        gpus = max(self.options.gpus, task.resources.gpus)
        return f"{files.QUEUE}{cores}c-{memory or 0}m-{gpus}g"

    def _need(self, task: Task) -> float:
        """Seconds a packed task may run: a pilot starts it only with that much time left."""
        _, _, walltime = self._request(task)
        return max(walltime or 0.0, task.timeout or 0.0)

    async def _submit_loop(self) -> None:
        context = self._context
        assert context is not None
        bound = 2 * self.options.command_timeout + 10
        while True:
            await self._submit_wake.wait()
            self._submit_wake.clear()
            if self.options.pack:
                await self._drop_tickets(bound)
                continue
            while self._to_submit:
                job = self._to_submit.popleft()
                if job.aborted:
                    continue  # given back by abort()
                self._submitting = job
                try:
                    job_id = await context.run_blocking(self._submit, job, timeout=bound)
                except SubmitFailed as exc:
                    if exc.transient and not job.aborted:
                        logger.warning("sbatch failed (%s); trying again in %s s", exc, SUBMIT_RETRY)
                        self._to_submit.appendleft(job)
                        await asyncio.sleep(SUBMIT_RETRY)
                        continue
                    self._forget(job)
                    if job.aborted:
                        job.attempt.give_back()
                    else:
                        refused = BackendError(
                            f"sbatch refused the job of {job.attempt.task!r}: {exc.message}"
                        )
                        refused.retryable = False  # the same job would be refused again
                        job.attempt.failed(refused)
                    continue
                except (BackendError, OSError) as exc:
                    # sbatch did not answer in time: it may have queued a job whose id we never
                    # learned, waiting in this attempt's directory for a go that never comes
                    # (stop() cancels it by its directory); the task gets a fresh attempt
                    self._forget(job)
                    if isinstance(exc, OSError):
                        exc = BackendError(f"the files of {job.attempt.task!r} cannot be written: {exc}")
                    job.attempt.failed(exc)
                    continue
                finally:
                    self._submitting = None
                job.job_id = job_id
                self._submitted.add(job_id)
                if job.aborted:
                    self._cancel(job_id)

    async def _drop_tickets(self, bound: float) -> None:
        """Write the calls and tickets of every attempt waiting, in one call off the loop."""
        assert self._context is not None
        jobs = [job for job in self._to_submit if not job.aborted]
        self._to_submit.clear()
        if not jobs:
            return
        try:
            await self._context.run_blocking(self._write_tickets, jobs, timeout=bound)
        except (BackendError, OSError) as exc:
            for job in jobs:
                if job.ticket is None:
                    self._forget(job)
                    job.attempt.failed(
                        BackendError(f"the files of a packed task cannot be written: {exc}")
                    )
        for job in jobs:
            if job.aborted and job.ticket is not None:
                self._withdraw_ticket(job)

    def _write_tickets(self, jobs: list[_Job]) -> None:
        """Write each attempt's call, then its ticket in the queue of its shape (thread)."""
        run_directory = self._run_directory
        assert run_directory is not None
        for job in jobs:
            self._write_call(job)
            queue = files.make_private_directory(run_directory / job.shape)
            ticket = queue / job.directory.name
            files.write_atomically(ticket, str(self._need(job.attempt.task)).encode())
            job.ticket = ticket

    def _write_call(self, job: _Job) -> None:
        files.make_private_directory(job.directory)
        function, arguments = job.attempt.payload
        key = job.attempt.task.key
        if key is not None:  # what a later server collects the result by if this one dies
            files.write_atomically(job.directory / files.KEY, key.encode())
        call = {
            "sys_path": self._sys_path,
            "log_levels": job.log_levels,
            "function": function,
            "arguments": arguments,
            "server_silence": self._silence,
        }
        files.write_atomically(job.directory / files.CALL, pickle.dumps(call, pickle.HIGHEST_PROTOCOL))

    def _withdraw_ticket(self, job: _Job) -> None:
        """Take back an unclaimed ticket (the attempt never runs), else stop its attempt."""
        assert job.ticket is not None
        try:
            job.ticket.unlink()
        except FileNotFoundError:  # a pilot claimed it: no go will come, and the abort stops it
            files.touch(job.directory / files.ABORT)
            if job.began:
                self._kill_here(job)
                return  # reported once its pilot says the process ended
        self._forget(job)
        job.attempt.give_back()

    def _submit(self, job: _Job) -> int:
        """Write the attempt's call and submit its job (thread)."""
        options = self.options
        attempt = job.attempt
        self._write_call(job)
        cores, memory, walltime = self._request(attempt.task)
        python = shlex.quote(options.python)
        spec = JobSpec(
            name=f"{options.job_name}-{attempt.id}",
            directory=job.directory,
            command=f"exec {python} -m taskplex_hpc.job {shlex.quote(str(job.directory))}",
            cores=cores,
            memory_mb=memory,
            walltime=walltime,
            gpus=max(options.gpus, attempt.task.resources.gpus),
        )
        return self.cluster.submit(spec, self._template_extras(job.directory))

    def _template_extras(self, directory: Path) -> dict[str, Any]:
        """The template's variables beyond pysqa's own."""
        options = self.options
        return {
            "output": str(directory / files.OUTPUT),
            "partition": None if self.cluster.directory_mode else options.queue,
            "account": options.account,
            "sbatch_options": list(options.sbatch_options),
        }

    # ------------------------------------------------------------------ abort

    def abort(self, attempt: Attempt) -> None:
        job = self._jobs.get(attempt.id)
        if job is None or job.aborted:
            return
        job.aborted = True
        if job.ticket is not None:
            self._withdraw_ticket(job)
            return
        if job.began:
            # the job's guard stops the work as soon as it sees this file, before scancel would
            files.touch(job.directory / files.ABORT)
            self._kill_here(job)
        if job.job_id is not None:
            self._cancel(job.job_id)
        elif job is not self._submitting:
            self._forget(job)  # never submitted: it never runs
            attempt.give_back()
        # else: the submit loop cancels the job as soon as sbatch has returned its id

    def _kill_here(self, job: _Job) -> None:
        """Kill the attempt's process at once if it runs on this very host (a node the server
        shares: a workstation's or a test cluster's Slurm); the guard and scancel cover the rest.

        The process is identified by its pid and by its working directory, which is the
        attempt's own, so a pid reused by another process is never hit.
        """
        if job.where is None or job.where[1] != self._host:
            return
        pid = job.where[0]
        try:
            if os.readlink(f"/proc/{pid}/cwd") != str(job.directory):
                return
        except OSError:
            return  # gone already, or not a system with /proc
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # it leads its group once its guard runs
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

    def _cancel(self, job_id: int) -> None:
        self._to_cancel.add(job_id)

    def _forget(self, job: _Job) -> None:
        self._jobs.pop(job.attempt.id, None)
        if job.job_id is None or job.job_id in self._gone:
            # no job of its own, or one already gone: nothing uses the directory any more
            # (a packed attempt's process is killed by its guard when the directory goes)
            self._gone.discard(job.job_id or -1)
            shutil.rmtree(job.directory, ignore_errors=True)
        else:
            self._finished[job.job_id] = job.directory

    # ------------------------------------------------------------------ poll

    async def _poll_loop(self) -> None:
        """Poll every ``interval``; packed, look at the files in between, as often as every LOOK
        while tasks come and go, backing off to ``interval`` while nothing changes."""
        interval = self.options.interval
        pause = interval
        next_poll = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, min(pause, next_poll - time.monotonic())))
            full = time.monotonic() >= next_poll - LOOK / 10
            changed = await self._poll(full)
            if full:
                next_poll = time.monotonic() + interval
            pause = LOOK if changed and self.options.pack else min(2 * pause, interval)

    async def _poll(self, full: bool = True) -> bool:
        """Look at the job files, and with ``full`` at the queue too; True if an attempt became
        ready, ended or was given its go."""
        context = self._context
        if context is None:
            return False
        bound = 2 * self.options.command_timeout + 10
        if full and self._to_cancel:
            cancelling = sorted(self._to_cancel)
            try:
                await context.run_blocking(self.cluster.cancel, cancelling, timeout=bound)
            except (SchedulerCommandError, BackendError) as exc:
                logger.warning("scancel %s failed (%s); trying again", cancelling, exc)
            else:
                self._to_cancel.difference_update(cancelling)
        pack = self.options.pack
        watched = [
            job
            for job in self._jobs.values()
            if (job.job_id if job.adopted or not pack else job.ticket) is not None
        ]
        if not watched and not self._finished and not self._pilots:
            return False
        # the queue first, the files after: a job gone from the queue had written its result
        queued: dict[int, str] | None = None
        if full:
            queued = await self._look_at_queue(bound)
        assert self._run_directory is not None
        scans = await context.run_blocking(
            _scan_all, watched, self._gone, self._run_directory / files.ALIVE, timeout=bound
        )
        go: list[Path] = []
        ended: list[_Job] = []
        # launched ahead (prefetch, a pilot's spare slots), a ready attempt waits for its go
        # until the work running leaves room for it: never more than `workers` slots' worth
        # runs at once; work whose result is in this look no longer runs
        over = {
            job.attempt.id
            for job, scan in zip(watched, scans, strict=True)
            if scan.exit is not None or (scan.result is not None and not job.aborted)
        }
        busy = sum(
            job.attempt.slots for job in self._jobs.values() if job.began and job.attempt.id not in over
        )
        for job, scan in zip(watched, scans, strict=True):
            for frame in scan.log:
                _emit(frame, job)
            ready = scan.started is not None and not job.began and not job.aborted
            if ready and busy + job.attempt.slots > context.workers:
                ready = False
            if ready:
                assert scan.started is not None
                pid, host, holder = ([*scan.started.split(), "?", "?", "?"])[:3]
                if pack and holder.isdigit():
                    job.pilot = int(holder)
                if pid.isdigit():
                    job.where = (int(pid), host)
                where = f"pilot job {holder}" if pack else f"Slurm job {holder}"
                if job.attempt.started(f"{where} (pid {pid} on {host})"):
                    job.began = True
                    busy += job.attempt.slots
                    go.append(job.directory / files.GO)
                elif pack:  # withdrawn while its pilot readied it: no go comes, abort ends it
                    job.aborted = True
                    files.touch(job.directory / files.ABORT)
                else:  # withdrawn while the job started: it must not run
                    job.aborted = True
                    assert job.job_id is not None
                    self._cancel(job.job_id)
            holder_id = job.pilot if pack and not job.adopted else job.job_id
            if scan.result is not None and not job.aborted:
                self._report(job, scan.result, scan.output)
            elif scan.exit is not None:
                self._forget(job)
                if job.aborted and not job.began:
                    job.attempt.give_back()  # it never ran: no go was written
                elif job.aborted:
                    job.attempt.failed(TaskCancelled("its process in a pilot job was stopped"))
                else:
                    where = f"pilot job {job.pilot}"
                    said = f"\n--- its output (last lines) ---\n{scan.output}" if scan.output else ""
                    job.attempt.failed(
                        WorkerLost(
                            f"the process running {job.attempt.task!r} in {where} {scan.exit}{said}"
                        ),
                        where,
                    )
            elif pack and job.aborted and not job.began:
                continue  # given back by abort(); its process ends at the abort file
            elif holder_id is not None and holder_id in self._gone:
                if job.aborted:
                    self._forget(job)
                    if job.began:
                        job.attempt.failed(TaskCancelled("its Slurm job was cancelled"))
                    else:
                        job.attempt.give_back()
                else:
                    job.gone_since = job.gone_since or time.monotonic()
                    ended.append(job)
        if go:
            await context.run_blocking(_write_go, go, timeout=bound)
        if ended and full:
            await self._report_endings(ended, bound)
        if pack and queued is not None:
            await self._start_pilots(bound)
        return bool(go or over)

    async def _look_at_queue(self, bound: float) -> dict[int, str] | None:
        """One squeue for all of this server's jobs, noting those gone; None if it failed."""
        context = self._context
        assert context is not None
        self.polls += 1
        # only jobs submitted before the look can be missing from it
        known = set(self._submitted)
        try:
            queued = await context.run_blocking(self.cluster.queued, known, timeout=bound)
        except (SchedulerCommandError, BackendError) as exc:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                logger.warning("squeue failed (%s); results are still read, endings wait", exc)
            return None
        if self._unreachable_since is not None:
            logger.warning(
                "squeue answers again after %.0f s", time.monotonic() - self._unreachable_since
            )
        self._unreachable_since = None
        gone = known - queued.keys()
        self._submitted -= gone
        self._gone |= gone
        cleanup = [self._finished.pop(job_id) for job_id in gone if job_id in self._finished]
        if cleanup:
            await context.run_blocking(_remove_directories, cleanup, timeout=bound)
        if self.options.pack:
            await self._pilots_gone([p for p in self._pilots if p in gone], bound)
        return queued

    # ------------------------------------------------------------------ pilots (packed)

    async def _pilots_gone(self, gone: list[int], bound: float) -> None:
        """Give back what pilots that ended had claimed but not started (their tickets)."""
        if not gone:
            return
        assert self._context is not None
        assert self._run_directory is not None
        claimed_dirs = [self._run_directory / f"{files.CLAIMED}{job_id}" for job_id in gone]
        claimed = await self._context.run_blocking(_listed, claimed_dirs, timeout=bound)
        for job_id in gone:
            del self._pilots[job_id]
        by_name = {job.directory.name: job for job in self._jobs.values()}
        for name in claimed:
            job = by_name.get(name)
            if job is not None and job.pilot is None and not job.began:
                self._forget(job)
                job.attempt.give_back()  # claimed by a pilot that ended before it readied it

    async def _start_pilots(self, bound: float) -> None:
        """Submit pilots where the live packed tasks of a shape need more than are queued."""
        assert self._context is not None
        demand: dict[str, list[_Job]] = collections.defaultdict(list)
        for job in self._jobs.values():
            if job.ticket is not None and not job.aborted:
                demand[job.shape].append(job)
        if not demand:
            return
        assert self._run_directory is not None
        listed = await self._context.run_blocking(_listed, [self._run_directory], timeout=bound)
        draining = {
            int(name.removeprefix(files.DRAINING))
            for name in listed
            if name.startswith(files.DRAINING) and name.removeprefix(files.DRAINING).isdigit()
        }
        for shape, jobs in demand.items():
            task = jobs[0].attempt.task
            slots = self._pilot_slots(task)
            # tickets dropped ahead wait for slots that free; more pilots than `workers` can
            # keep busy would only hold an allocation each
            needed = min(len(jobs), max(1, self._context.workers // self.slots(task)))
            wanted = -(-needed // slots)
            have = sum(
                1
                for job_id, served in self._pilots.items()
                if served == shape and job_id not in draining
            )
            for _ in range(wanted - have):
                try:
                    job_id = await self._context.run_blocking(
                        self._submit_pilot, shape, jobs[0].attempt.task, slots, timeout=bound
                    )
                except (SubmitFailed, BackendError, OSError) as exc:
                    failed = self._pilot_refused(exc, jobs)
                    if failed:
                        return
                    logger.warning("a pilot could not be submitted (%s); trying again", exc)
                    return
                self._pilots[job_id] = shape
                self._submitted.add(job_id)

    def _pilot_refused(self, exc: BaseException, jobs: list[_Job]) -> bool:
        """Fail the tasks of a shape whose pilot sbatch refuses for good; True if it did."""
        if not isinstance(exc, SubmitFailed) or exc.transient:
            return False
        for job in jobs:
            refused = BackendError(
                f"sbatch refused the pilot job for {job.attempt.task!r}: {exc.message}"
            )
            refused.retryable = False
            if job.ticket is not None:
                job.ticket.unlink(missing_ok=True)
            self._forget(job)
            job.attempt.failed(refused)
        return True

    def _pilot_slots(self, task: Task) -> int:
        """How many tasks of ``task``'s shape one pilot runs at once."""
        assert self._context is not None
        cores, _, _ = self._request(task)
        size = self.options.pilot_cores or self._context.workers
        limits = self._limits
        if limits is not None and limits.cores_max is not None:
            size = min(size, limits.cores_max)
        return max(1, size // cores)

    def _submit_pilot(self, shape: str, task: Task, slots: int) -> int:
        """Submit one pilot job for tasks of ``shape`` (thread)."""
        options = self.options
        run_directory = self._run_directory
        assert run_directory is not None
        self._pilot_count += 1
        directory = files.make_private_directory(run_directory / f"pilot-{self._pilot_count}")
        cores, memory, _ = self._request(task)
        gpus = max(options.gpus, task.resources.gpus)
        python = shlex.quote(options.python)
        queue = shlex.quote(str(run_directory / shape))
        spec = JobSpec(
            name=f"{options.job_name}-pilot",
            directory=directory,
            command=(
                f"exec {python} -m taskplex_hpc.pilot {queue} {slots} "
                f"{options.pilot_walltime:g} {options.pilot_idle:g}"
            ),
            cores=cores * slots,
            memory_mb=None if memory is None else memory * slots,
            walltime=options.pilot_walltime,
            gpus=gpus * slots,
        )
        job_id = self.cluster.submit(spec, self._template_extras(directory))
        self._finished[job_id] = directory  # removed once the pilot has left the queue
        return job_id

    async def _report_endings(self, ended: list[_Job], bound: float) -> None:
        assert self._context is not None
        holders = {
            job: job.pilot if self.options.pack and not job.adopted else job.job_id for job in ended
        }
        ids = sorted({holder for holder in holders.values() if holder is not None})
        try:
            endings: dict[int, JobEnd] = await self._context.run_blocking(
                self.cluster.endings, ids, timeout=2 * bound
            )
        except BackendError as exc:
            logger.warning("scontrol/sacct did not answer (%s); trying again", exc)
            return
        grace = self.options.result_grace
        now = time.monotonic()
        for job in ended:
            holder = holders[job]
            assert holder is not None
            assert job.gone_since is not None
            end = endings.get(holder)
            waited = now - job.gone_since
            # a result on a shared filesystem may show up late; a clean exit is given time
            clean = end is None or (end.state == "COMPLETED" and end.exit_code == 0)
            if clean and waited < grace:
                continue
            output = files.tail(job.directory / files.OUTPUT)
            error = no_record(holder, output) if end is None else error_for(end, output)
            if end is not None and end.state == "COMPLETED":
                error = ResultUnreadable(
                    f"{error} within {grace:g} s (the result_grace option) in {job.directory}"
                )
            self._forget(job)
            job.attempt.failed(error, f"Slurm job {holder}")

    def _report(
        self, job: _Job, data: bytes | BaseException, output: str, worker: str | None = None
    ) -> None:
        self._forget(job)
        attempt = job.attempt
        if worker is None:
            pilot = self.options.pack and not job.adopted
            worker = f"pilot job {job.pilot}" if pilot else f"Slurm job {job.job_id}"
        if isinstance(data, BaseException):
            attempt.failed(ResultUnreadable(f"the result of {worker} cannot be read: {data}"), worker)
            return
        try:
            kind, payload = pickle.loads(data)
            value = loads(payload)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # even SystemExit from a __reduce__ fails only this task
            attempt.failed(
                ResultUnreadable(
                    f"the result of {worker} for {attempt.task!r} cannot be unpickled here: "
                    f"{type(exc).__name__}: {exc}"
                ),
                worker,
            )
            return
        if kind == "result":
            attempt.succeeded(value, worker)
        elif isinstance(value, ExceptionPayload):
            error = restore_exception(value)
            if output:
                error.add_note(f"output of {worker} (last lines):\n{output}")
            attempt.failed(error, worker)
        else:
            attempt.failed(ResultUnreadable(f"{worker} wrote {value!r} as its exception"), worker)


def _scan_all(jobs: list[_Job], gone: set[int], alive: Path) -> list[_Scan]:
    """Beat the heart, and look into each job's directory (thread): readiness, result, new log
    records."""
    with contextlib.suppress(OSError):
        os.utime(alive)
    scans = []
    for job in jobs:
        scan = _Scan()
        directory = job.directory
        if not job.began:
            with contextlib.suppress(OSError, files.UntrustedFile):
                scan.started = files.read_trusted(directory / files.STARTED).decode(errors="replace")
        scan.log = job.log.read()
        result = directory / files.RESULT
        if os.path.lexists(result):
            try:
                scan.result = files.read_trusted(result)
            except (OSError, files.UntrustedFile) as exc:
                scan.result = exc
            else:
                if not scan.result:
                    scan.result = EOFError(f"{result} is empty")
        elif job.ticket is not None:
            with contextlib.suppress(OSError, files.UntrustedFile):
                scan.exit = files.read_trusted(directory / files.EXIT).decode(errors="replace")
        holder = job.pilot if job.ticket is not None else job.job_id
        if scan.result is not None or scan.exit is not None or holder in gone:
            scan.log += job.log.read()
            scan.output = files.tail(directory / files.OUTPUT)
        scans.append(scan)
    return scans


def _listed(directories: list[Path]) -> list[str]:
    names: list[str] = []
    for directory in directories:
        with contextlib.suppress(OSError):
            names.extend(os.listdir(directory))
    return names


def _write_go(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # the attempt's directory is gone
            files.write_atomically(path, b"")


def _remove_directories(directories: list[Path]) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def _emit(frame: bytes, job: _Job) -> None:
    try:
        emit_record(unpack_record(frame))
    except Exception:  # a handler or filter of the caller's; the task goes on regardless
        logger.exception("a log record from Slurm job %s could not be re-emitted", job.job_id)


class HPCServer(TaskServer):
    """A server whose every attempt is a batch job on a Slurm cluster (through pysqa).

    ropt's options, with their meanings: ``workdir`` (a directory on a filesystem the compute
    nodes share; each server keeps its files in a private run directory there), ``workers`` (the
    most job slots in use at once: a job counts its cores), ``queue_size``, ``interval`` (seconds
    between looks at the queue and the job files), ``queue_type`` ("slurm"), ``template`` (a
    Jinja submission script) or ``config_path`` (a pysqa configuration directory), ``cluster``
    (a cluster of that directory's clusters.yaml), ``queue`` (a queue of queue.yaml, or the Slurm
    partition with a template) and ``cores`` (CPUs per job).

    Beyond ropt: ``memory`` (MB per job) and ``walltime`` (seconds, or "HH:MM:SS") as defaults
    for tasks whose ``resources`` do not say, ``gpus``, ``account``, ``sbatch_options`` (extra
    ``#SBATCH`` lines), ``python`` (the interpreter jobs run; default this one, which must be
    reachable from the compute nodes), ``job_name`` (prefix of job names), ``command_timeout``
    (seconds any scheduler command may take) and ``result_grace`` (seconds a result may take to
    appear on the shared filesystem after its job left the queue).

    ``prefetch`` (slots launched ahead of ``workers``; default none with a job per task, and
    ``workers`` when packing): their jobs wait in the queue, or their tickets for a pilot's slot,
    and once started wait for their go, so that the scheduler's latency overlaps the work
    running; never more than ``workers`` slots' worth of tasks runs at once.

    Packing: with ``pack=True`` tasks do not get a job each; the server starts pilot jobs of
    ``pilot_cores`` CPUs (default ``workers``) and ``pilot_walltime`` that take tasks from the
    shared ``workdir`` and run them side by side in worker processes they keep (as mp's are
    kept; a worker whose task is cancelled is killed and replaced); a pilot starts no
    task that cannot finish in its remaining time, and exits after ``pilot_idle`` seconds
    without work. Tasks with different cores, memory or gpus get pilots sized for them.
    """

    backend_class = HPCBackend

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] = "./",
        workers: int = 1,
        queue_size: int = 0,
        interval: float = 1.0,
        queue_type: str = "slurm",
        template: str | None = None,
        config_path: str | os.PathLike[str] | None = None,
        cluster: str | None = None,
        queue: str | None = None,
        cores: int = 1,
        memory: int | None = None,
        walltime: float | str | None = None,
        gpus: int = 0,
        account: str | None = None,
        sbatch_options: Sequence[str] = (),
        python: str | os.PathLike[str] | None = None,
        job_name: str = "taskplex",
        command_timeout: float = 30.0,
        result_grace: float = 30.0,
        prefetch: int | None = None,
        pack: bool = False,
        pilot_cores: int | None = None,
        pilot_walltime: float | str = 3600.0,
        pilot_idle: float = 30.0,
    ) -> None:
        options = Options.check(
            workdir=workdir,
            interval=interval,
            queue_type=queue_type,
            template=template,
            config_path=config_path,
            cluster=cluster,
            queue=queue,
            cores=cores,
            memory=memory,
            walltime=walltime,
            gpus=gpus,
            account=account,
            sbatch_options=sbatch_options,
            python=python,
            job_name=job_name,
            command_timeout=command_timeout,
            result_grace=result_grace,
            prefetch=prefetch,
            pack=pack,
            pilot_cores=pilot_cores,
            pilot_walltime=pilot_walltime,
            pilot_idle=pilot_idle,
        )
        super().__init__(HPCBackend(options), workers=workers, queue_size=queue_size)
