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

A job that has started waits for ``go`` before it runs anything, so a task cancelled while its
job was pending or starting never runs (``withdraws_launched``). The work of a running task is
stopped with ``scancel`` (``cancel_running``, ``timeout_kills_work``), and an attempt keeps its
slots until its job has left the queue.
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
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
)
from taskplex.backend import Attempt, Backend, BackendContext
from taskplex.errors import ExceptionPayload, restore_exception
from taskplex.remote_logging import emit_record, logger_levels, unpack_record
from taskplex.serialization import dumps_call, loads
from taskplex_hpc import files
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


@dataclass(eq=False)
class _Job:
    """One attempt on its way through the batch system."""

    attempt: Attempt
    directory: Path
    log_levels: dict[str, int]
    job_id: int | None = None
    began: bool = False
    """The job said it is ready, and the attempt was allowed to start."""
    aborted: bool = False
    gone_since: float | None = None
    """When the job was first seen gone from the queue without a result."""
    log: files.LogReader = field(init=False)

    def __post_init__(self) -> None:
        self.log = files.LogReader(self.directory / files.LOG)


@dataclass
class _Scan:
    """What one look at an attempt's directory found (read in a thread)."""

    started: str | None = None
    result: bytes | BaseException | None = None
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
        self._sys_path: list[str] = []
        self._jobs: dict[int, _Job] = {}
        """Attempt id -> job, for every attempt not yet reported over."""
        self._to_submit: collections.deque[_Job] = collections.deque()
        self._submitting: _Job | None = None
        self._submit_wake = asyncio.Event()
        self._to_cancel: set[int] = set()
        self._submitted: set[int] = set()
        """Job ids of this run not yet seen gone from the queue (stop cancels what is left)."""
        self._finished: dict[int, Path] = {}
        """Reported jobs still in the queue: their directories are removed once they are gone."""
        self._unreachable_since: float | None = None
        self.polls = 0
        """How many times the server looked at the queue (one squeue call each)."""

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
        self._context = context
        # the caller's modules (its script's directory, test directories) are found in jobs too
        self._sys_path = list(sys.path)
        self._submit_wake = asyncio.Event()
        context.spawn(self._submit_loop(), name="hpc-submit")
        context.spawn(self._poll_loop(), name="hpc-poll")

    async def stop(self) -> None:
        context, self._context = self._context, None
        if context is None:
            return
        run_directory = self._run_directory
        leftover = sorted(self._submitted)
        try:
            await context.run_blocking(self._cancel_everything, leftover, timeout=STOP_BOUND + 10)
        except BackendError as exc:
            logger.error("jobs of this server may be left in the queue: %s", exc)
        if run_directory is not None:
            await context.run_blocking(shutil.rmtree, run_directory, True, timeout=STOP_BOUND)
        self._jobs.clear()
        self._to_submit.clear()
        self._submitted.clear()
        self._finished.clear()
        self._to_cancel.clear()

    def _cancel_everything(self, job_ids: list[int]) -> None:
        """Cancel these jobs and any other job running in this server's directory; wait until
        none is in the queue (thread)."""
        run_directory = str(self._run_directory)
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
                if int(job_id) in job_ids or str(directory).startswith(run_directory)
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
            job = _Job(attempt, run_directory / str(attempt.id), levels)
            self._jobs[attempt.id] = job
            self._to_submit.append(job)
        self._submit_wake.set()

    async def _submit_loop(self) -> None:
        context = self._context
        assert context is not None
        bound = 2 * self.options.command_timeout + 10
        while True:
            await self._submit_wake.wait()
            self._submit_wake.clear()
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

    def _submit(self, job: _Job) -> int:
        """Write the attempt's call and submit its job (thread)."""
        options = self.options
        attempt = job.attempt
        files.make_private_directory(job.directory)
        function, arguments = attempt.payload
        call = {
            "sys_path": self._sys_path,
            "log_levels": job.log_levels,
            "function": function,
            "arguments": arguments,
            "go_timeout": max(120.0, 60 * options.interval),
        }
        files.write_atomically(job.directory / files.CALL, pickle.dumps(call, pickle.HIGHEST_PROTOCOL))
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
        extra = {
            "output": str(job.directory / files.OUTPUT),
            "partition": None if self.cluster.directory_mode else options.queue,
            "account": options.account,
            "sbatch_options": list(options.sbatch_options),
        }
        return self.cluster.submit(spec, extra)

    # ------------------------------------------------------------------ abort

    def abort(self, attempt: Attempt) -> None:
        job = self._jobs.get(attempt.id)
        if job is None or job.aborted:
            return
        job.aborted = True
        if job.began:
            # the job's guard stops the work as soon as it sees this file, before scancel would
            files.touch(job.directory / files.ABORT)
        if job.job_id is not None:
            self._cancel(job.job_id)
        elif job is not self._submitting:
            self._forget(job)  # never submitted: it never runs
            attempt.give_back()
        # else: the submit loop cancels the job as soon as sbatch has returned its id

    def _cancel(self, job_id: int) -> None:
        self._to_cancel.add(job_id)

    def _forget(self, job: _Job) -> None:
        self._jobs.pop(job.attempt.id, None)
        if job.job_id is None:
            shutil.rmtree(job.directory, ignore_errors=True)
        else:
            self._finished[job.job_id] = job.directory

    # ------------------------------------------------------------------ poll

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval)
            await self._poll()

    async def _poll(self) -> None:
        context = self._context
        if context is None:
            return
        bound = 2 * self.options.command_timeout + 10
        if self._to_cancel:
            cancelling = sorted(self._to_cancel)
            try:
                await context.run_blocking(self.cluster.cancel, cancelling, timeout=bound)
            except (SchedulerCommandError, BackendError) as exc:
                logger.warning("scancel %s failed (%s); trying again", cancelling, exc)
            else:
                self._to_cancel.difference_update(cancelling)
        watched = [job for job in self._jobs.values() if job.job_id is not None]
        if not watched and not self._finished:
            return
        # the queue first, the files after: a job gone from the queue had written its result
        queued: dict[int, str] | None
        self.polls += 1
        try:
            queued = await context.run_blocking(self.cluster.queued, [*self._submitted], timeout=bound)
        except (SchedulerCommandError, BackendError) as exc:
            queued = None
            now = time.monotonic()
            if self._unreachable_since is None:
                self._unreachable_since = now
                logger.warning("squeue failed (%s); results are still read, endings wait", exc)
        else:
            if self._unreachable_since is not None:
                logger.warning(
                    "squeue answers again after %.0f s", time.monotonic() - self._unreachable_since
                )
            self._unreachable_since = None
            self._submitted.intersection_update(queued)
            cleanup = [
                self._finished.pop(job_id) for job_id in list(self._finished) if job_id not in queued
            ]
            if cleanup:
                await context.run_blocking(_remove_directories, cleanup, timeout=bound)
        scans = await context.run_blocking(_scan_all, watched, queued, timeout=bound)
        go: list[Path] = []
        ended: list[_Job] = []
        for job, scan in zip(watched, scans, strict=True):
            for frame in scan.log:
                _emit(frame, job)
            if scan.started is not None and not job.began and not job.aborted:
                if job.attempt.started(f"Slurm job {job.job_id} ({scan.started})"):
                    job.began = True
                    go.append(job.directory / files.GO)
                else:  # withdrawn while the job started: it must not run
                    job.aborted = True
                    assert job.job_id is not None
                    self._cancel(job.job_id)
            if scan.result is not None and not job.aborted:
                self._report(job, scan.result, scan.output)
            elif queued is not None and job.job_id not in queued:
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
        if ended:
            await self._report_endings(ended, bound)

    async def _report_endings(self, ended: list[_Job], bound: float) -> None:
        assert self._context is not None
        ids = [job.job_id for job in ended if job.job_id is not None]
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
            assert job.job_id is not None
            assert job.gone_since is not None
            end = endings.get(job.job_id)
            waited = now - job.gone_since
            # a result on a shared filesystem may show up late; a clean exit is given time
            clean = end is None or (end.state == "COMPLETED" and end.exit_code == 0)
            if clean and waited < grace:
                continue
            output = files.tail(job.directory / files.OUTPUT)
            error = no_record(job.job_id, output) if end is None else error_for(end, output)
            if end is not None and end.state == "COMPLETED":
                error = ResultUnreadable(
                    f"{error} within {grace:g} s (the result_grace option) in {job.directory}"
                )
            self._forget(job)
            job.attempt.failed(error, f"Slurm job {job.job_id}")

    def _report(self, job: _Job, data: bytes | BaseException, output: str) -> None:
        self._forget(job)
        attempt = job.attempt
        worker = f"Slurm job {job.job_id}"
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


def _scan_all(jobs: list[_Job], queued: dict[int, str] | None) -> list[_Scan]:
    """Look into each job's directory (thread): readiness, result, new log records."""
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
        if scan.result is not None or (queued is not None and job.job_id not in queued):
            scan.log += job.log.read()
            scan.output = files.tail(directory / files.OUTPUT)
        scans.append(scan)
    return scans


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
        )
        super().__init__(HPCBackend(options), workers=workers, queue_size=queue_size)
