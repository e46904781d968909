"""SubprocessServer: every attempt runs in a fresh Python process, started for it and ended after it.

Data flow, on the server's event loop except the first line::

    submit (caller's thread) ── prepare(): dumps_call pickles the call, or SerializationError
    TaskServer ── launch([attempt]) ──► WorkerProcess: `python -m taskplex_subprocess.worker`
                                         │ socket pair: the configuration and the call
                                         ▼
                        worker process: loads the call ── READY ──► attempt.started()?
                                         ◄── GO (True), or the process is killed (False)
                                         │ runs the function; LOG frames meanwhile
                                         ▼
    attempt.succeeded / failed / give_back ◄── the process ended: RESULT, ERROR, or how it died

Written only against taskplex's public API, as a backend for remote machines or a batch system
would be: nothing of the task runs in the caller's process, everything it needs travels pickled,
and the server knows of an attempt only what its worker sent back and how the process ended. The
server owns queueing, timeouts, retries, dependencies, cancellation and hooks; this module starts
one process per attempt, says what its frames and its end mean, and kills it when the server no
longer wants its work.

**Starting.** The worker says READY once it has loaded the call, and runs the function only after
the backend answered GO, which it does only if ``attempt.started()`` says the attempt is still
wanted. So a task withdrawn while its interpreter was starting never runs, and its timeout counts
from the moment the function really starts, not from the interpreter's start-up.

**Stopping work.** Cancelling or timing out a running attempt kills the worker's process group with
SIGKILL, so processes the task started die too; so does every worker's end, whatever the reason.
A worker that dies by itself fails its attempt with WorkerLost saying how it ended, and the server
retries it within the task's ``retries``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Sequence

from taskplex import (
    BackendUnavailable,
    Capabilities,
    InvalidOption,
    ResultUnreadable,
    Task,
    TaskCancelled,
    TaskServer,
    WorkerLost,
)
from taskplex.backend import Attempt, Backend, BackendContext
from taskplex.errors import ExceptionPayload, restore_exception
from taskplex.remote_logging import LevelWatch, emit_record, unpack_record
from taskplex.serialization import dumps_call, loads
from taskplex_subprocess._wire import GO, LOG, READY, RESULT
from taskplex_subprocess._worker_process import WorkerProcess, describe_exit

__all__ = ["LABEL_VARIABLE", "SubprocessBackend", "SubprocessServer", "default_workers"]

logger = logging.getLogger("taskplex.subprocess")

LABEL_VARIABLE = "TASKPLEX_SUBPROCESS_LABEL"
"""The environment variable that carries the server's ``label`` into every worker (and into
whatever the task starts), so that tools outside the server can find them."""
DEFAULT_LABEL = "taskplex"
CHECK_TIMEOUT = 60.0
"""Seconds the check of a ``python`` interpreter (can it import the worker?) may take."""

_usable_interpreters: set[str] = set()
"""Interpreters this process already checked: the check costs a start-up, so it is done once."""


def default_workers() -> int:
    """One worker per CPU this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def find_interpreter(python: object) -> str:
    """The absolute path of the interpreter ``python`` names; InvalidOption saying what is wrong."""
    if python is None:
        if not sys.executable:
            raise InvalidOption("python: this interpreter does not know its own path; pass python=")
        return sys.executable
    if not isinstance(python, str | os.PathLike):
        raise InvalidOption(f"python must be a path or a command name (str), got {python!r}")
    name = os.fspath(python)
    if not isinstance(name, str) or not name:
        raise InvalidOption(f"python must be a non-empty path or command name, got {python!r}")
    found = shutil.which(name)
    if found is not None:
        return os.path.abspath(found)
    if os.sep not in name:
        raise InvalidOption(f"python={name!r}: no such command on PATH")
    if not os.path.exists(name):
        raise InvalidOption(f"python={name!r}: no such file")
    if os.path.isdir(name):
        raise InvalidOption(f"python={name!r} is a directory, not an interpreter")
    raise InvalidOption(f"python={name!r} is not executable")


def check_label(label: object) -> str:
    if not isinstance(label, str) or not label or "\0" in label:
        raise InvalidOption(f"label must be a non-empty str without NUL characters, got {label!r}")
    return label


def _interpreter_problem(python: str) -> str | None:
    """Why ``python`` cannot run workers, or None if it can (blocking: a process start)."""
    # the worker module's name printed back: not something any program answers by chance
    code = "import taskplex_subprocess.worker as worker; print(worker.__name__)"
    try:
        check = subprocess.run(
            [python, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if check.returncode == 0 and check.stdout.strip() == "taskplex_subprocess.worker":
        return None
    output = (check.stderr.strip() or check.stdout.strip()).splitlines()
    said = output[-1] if output else "nothing"
    return f"`{python} -c 'import taskplex_subprocess.worker'` {describe_exit(check.returncode)}: {said}"


class SubprocessBackend(Backend):
    """Run each attempt in a fresh Python process started with the interpreter ``python``."""

    # remote: nothing runs in the caller's process; worker_processes: the workers are its children
    capabilities = Capabilities(
        cancel_running=True,
        timeout_kills_work=True,
        survives_worker_death=True,
        remote=True,
        worker_processes=True,
        forwards_logs=True,
        resources=frozenset({"cores"}),
    )

    def __init__(
        self, *, python: str | os.PathLike[str] | None = None, label: str = DEFAULT_LABEL
    ) -> None:
        self.python = find_interpreter(python)
        self.label = check_label(label)
        self._context: BackendContext | None = None
        self._config = b""
        self._levels = LevelWatch()
        self._env: dict[str, str] = {}
        self._workers: dict[int, WorkerProcess] = {}

    async def start(self, context: BackendContext) -> None:
        if os.name != "posix":
            raise BackendUnavailable("the subprocess backend needs a POSIX system (Linux, macOS)")
        if self.python not in _usable_interpreters:
            problem = await context.run_blocking(
                _interpreter_problem, self.python, timeout=CHECK_TIMEOUT + 5
            )
            if problem is not None:
                raise BackendUnavailable(
                    f"python={self.python!r} cannot run taskplex workers ({problem}); install "
                    "taskplex-backend-subprocess into its environment"
                )
            _usable_interpreters.add(self.python)
        self._context = context
        # workers log at the caller's levels, as they are when each attempt starts
        self._levels = LevelWatch()
        self._config = self._pickled_config()
        self._env = {**os.environ, LABEL_VARIABLE: self.label}

    def _pickled_config(self) -> bytes:
        config = {"sys_path": sys.path, "log_levels": self._levels.levels}
        return pickle.dumps(config, pickle.HIGHEST_PROTOCOL)

    async def stop(self) -> None:
        # every attempt was reported over, unless the server gave up waiting for one
        workers = list(self._workers.values())
        for worker in workers:
            logger.warning("killing worker %s, still running at stop", worker.name)
            worker.kill()
        for worker in workers:
            await worker.ended
        self._context = None

    def prepare(self, task: Task) -> bytes:
        if inspect.iscoroutinefunction(task.function):
            raise InvalidOption(
                f"{type(self).__name__} runs plain functions, and {task.function!r} is a coroutine "
                'function; use a backend that runs coroutines, e.g. taskplex.Executor("async")'
            )
        return pickle.dumps(dumps_call(task.function, task.args, task.kwargs), pickle.HIGHEST_PROTOCOL)

    def launch(self, attempts: Sequence[Attempt]) -> None:
        assert self._context is not None, "launch() runs only between start() and stop()"
        loop = self._context.loop
        command = [self.python, "-m", "taskplex_subprocess.worker"]
        for attempt in attempts:
            try:
                worker = WorkerProcess(
                    command, self._env, loop, functools.partial(self._on_frame, attempt)
                )
            except OSError as exc:
                attempt.failed(WorkerLost(f"no worker process could be started: {exc}"))
                continue
            self._workers[attempt.id] = worker
            worker.ended.add_done_callback(functools.partial(self._on_end, attempt, worker))
            if self._levels.changed() is not None:
                self._config = self._pickled_config()
            worker.send(self._config)
            worker.send(attempt.payload)

    def abort(self, attempt: Attempt) -> None:
        worker = self._workers.get(attempt.id)
        if worker is not None:
            worker.kill()  # reported over when it has ended

    def _on_frame(self, attempt: Attempt, worker: WorkerProcess, kind: int, payload: bytes) -> None:
        if kind == LOG:
            try:
                emit_record(unpack_record(payload))
            except Exception:  # a handler or filter of the caller's; the task goes on regardless
                logger.exception("a log record from worker %s could not be re-emitted", worker.name)
        elif kind == READY:
            if attempt.started(worker.name):
                worker.began = True
                worker.send(GO)
            else:
                worker.kill()  # withdrawn while its interpreter started: the function never runs
        else:
            worker.outcome = (kind, payload)

    def _on_end(
        self, attempt: Attempt, worker: WorkerProcess, ended: asyncio.Future[int | None]
    ) -> None:
        del self._workers[attempt.id]
        if worker.outcome is not None:
            self._report_outcome(attempt, worker, *worker.outcome)
        elif worker.killed:
            if worker.began:
                attempt.failed(TaskCancelled("its attempt was stopped"), worker.name)
            else:
                attempt.give_back()
        else:
            how = describe_exit(ended.result())
            if not worker.began:
                how += " before the task began (its error output, if any, went to stderr)"
            attempt.failed(
                WorkerLost(f"the worker process running {attempt.task!r} ({worker.name}) {how}"),
                worker.name,
            )

    def _report_outcome(
        self, attempt: Attempt, worker: WorkerProcess, kind: int, payload: bytes
    ) -> None:
        try:
            value = loads(payload)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # even SystemExit from a __reduce__ fails only this task
            what = "result" if kind == RESULT else "exception"
            unreadable = ResultUnreadable(
                f"the {what} of {attempt.task!r} cannot be unpickled here: {type(exc).__name__}: {exc}"
            )
            attempt.failed(unreadable, worker.name)
            return
        if kind == RESULT:
            attempt.succeeded(value, worker.name)
        elif isinstance(value, ExceptionPayload):
            attempt.failed(restore_exception(value), worker.name)
        else:
            unreadable = ResultUnreadable(f"worker {worker.name} sent {value!r} as an exception")
            attempt.failed(unreadable, worker.name)


class SubprocessServer(TaskServer):
    """A server whose every attempt runs in a fresh Python process.

    Options: ``workers`` (attempts running at once; default one per CPU this process may use),
    ``queue_size``, ``python`` (the interpreter that runs workers; default this one) and
    ``label`` (put in every worker's environment as ``TASKPLEX_SUBPROCESS_LABEL``).
    """

    backend_class = SubprocessBackend

    def __init__(
        self,
        *,
        workers: int | None = None,
        queue_size: int = 0,
        python: str | os.PathLike[str] | None = None,
        label: str = DEFAULT_LABEL,
    ) -> None:
        backend = SubprocessBackend(python=python, label=label)
        super().__init__(
            backend, workers=default_workers() if workers is None else workers, queue_size=queue_size
        )
