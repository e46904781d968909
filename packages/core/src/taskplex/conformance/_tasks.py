"""The functions the conformance suite runs as tasks.

They live at module level in an importable module so that backends running tasks in other processes
(or on other machines sharing the test's directory) can import them by name. They report what they
did through files in a directory the test owns, never through the API under test, and every wait
in them is bounded so that a stuck test ends. This module must not import pytest: workers may not
have it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskplex.conformance import BOUND

if TYPE_CHECKING:
    from taskplex.executor import Executor
    from taskplex.scheduler import TaskServer

POLL = 0.01
RELEASE_ALL = "all.release"
"""Created by the suite when a test ends, so that no held task outlives its test by long."""
SLOTS = "slots"
OPEN_SLOTS = "slots.open"


class TaskFailure(Exception):
    """The exception a task raises on purpose, to check that it arrives as itself."""


class TaskBaseException(BaseException):
    """A BaseException of the task's own (not an Exception): it must fail only its task."""


BASE_EXCEPTIONS = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "TaskBaseException": TaskBaseException,
}


class UnpicklableFailure(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------
# plain values and errors
# ---------------------------------------------------------------------------------------------------


def echo(value: Any) -> Any:
    return value


def raise_failure(message: str) -> None:
    raise TaskFailure(message)


def raise_unpicklable(message: str) -> None:
    raise UnpicklableFailure(message)


def raise_base_exception(kind: str, directory: str) -> None:
    """Count a run of ``kind``, then raise that BaseException (SystemExit(3) for SystemExit)."""
    record_run(Path(directory), kind)
    exception = BASE_EXCEPTIONS[kind]
    raise exception(3) if exception is SystemExit else exception(f"{kind} from the task")


def count_run(directory: str, name: str) -> str:
    """Count one run of ``name`` (marker files ``<name>.run<n>``); return ``name``."""
    record_run(Path(directory), name)
    return name


def return_unpicklable() -> threading.Lock:
    return threading.Lock()


def path_exists(path: str) -> bool:
    return os.path.exists(path)


# ---------------------------------------------------------------------------------------------------
# side channels: marker files
# ---------------------------------------------------------------------------------------------------


def touch_and_wait(directory: str, name: str, hold: bool = False) -> str:
    """Write ``<name>.started``; if ``hold``, wait for ``<name>.release``; write ``<name>.done``."""
    folder = Path(directory)
    (folder / f"{name}.started").touch()
    if hold:
        _wait_for_release(folder, name)
    (folder / f"{name}.done").touch()
    return name


def fail_until(directory: str, name: str, succeed_on_run: int) -> int:
    """Raise TaskFailure on every run before run number ``succeed_on_run``; return the run number."""
    run = record_run(Path(directory), name)
    if run < succeed_on_run:
        raise TaskFailure(f"{name} failed on run {run}")
    return run


def occupy_slot(directory: str, name: str, count: int = 1) -> int:
    """Hold ``count`` slot files until the test opens the gate; return the most seen at once."""
    slots = Path(directory) / SLOTS
    mine = [slots / f"{name}.{i}" for i in range(count)]
    for path in mine:
        path.touch()
    peak = 0
    deadline = time.monotonic() + BOUND
    try:
        while True:
            peak = max(peak, len(os.listdir(slots)))
            if (Path(directory) / OPEN_SLOTS).exists() or (Path(directory) / RELEASE_ALL).exists():
                return peak
            if time.monotonic() > deadline:
                raise TimeoutError(f"the slot gate stayed closed for {BOUND} s")
            time.sleep(POLL)
    finally:
        for path in mine:
            path.unlink(missing_ok=True)  # a k-core task may run as k calls (SPMD, as MPI does)


def wait_to_be_killed(directory: str, name: str, survive_from_run: int = 0) -> int:
    """Write this process's pid to ``<name>.pid<run>`` and wait to be killed.

    From run number ``survive_from_run`` on (0: never), return the run number instead.
    """
    folder = Path(directory)
    run = record_run(folder, name)
    pid_file = folder / f"{name}.pid{run}"
    scratch = pid_file.with_suffix(".tmp")
    scratch.write_text(f"{os.getpid()} {socket.gethostname()}")
    scratch.rename(pid_file)  # the test must never read a half-written pid
    if survive_from_run and run >= survive_from_run:
        return run
    _wait_for_release(folder, name)
    raise TimeoutError(f"{name} was released instead of killed")


def record_run(folder: Path, name: str) -> int:
    """Count one more run of ``name``, safely across processes; return its number (from 1)."""
    run = 1
    while True:
        try:
            os.close(os.open(folder / f"{name}.run{run}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            run += 1
        else:
            return run


def _wait_for_release(folder: Path, name: str) -> None:
    mine, everyone = folder / f"{name}.release", folder / RELEASE_ALL
    deadline = time.monotonic() + BOUND
    while not (mine.exists() or everyone.exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not released within {BOUND} s")
        time.sleep(POLL)


# ---------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------


def emit_log_records(logger_name: str) -> None:
    """Log one record below INFO, one at INFO, and one at INFO whose argument cannot be pickled."""
    log = logging.getLogger(logger_name)
    log.debug("below the configured level")
    log.info("visible record %s", 42)
    log.info("holding %s", threading.Lock())


# ---------------------------------------------------------------------------------------------------
# submitting from inside a task
# ---------------------------------------------------------------------------------------------------


def submit_from_task(executor: Executor, value: Any) -> Any:
    """Submit ``echo(value)`` to ``executor`` from inside a task and return its result."""
    return executor.submit(echo, value).result(timeout=BOUND)


async def echo_coroutine(value: Any) -> Any:
    await asyncio.sleep(0)
    return value


async def submit_from_coroutine(server: TaskServer, value: Any) -> Any:
    """Submit ``echo(value)`` to ``server`` from a coroutine running on its loop; return the result."""
    from taskplex.results import ResultsQueue
    from taskplex.task import Task

    results = ResultsQueue()
    await server.submit(Task(echo, (value,), results_queue=results))
    finished = await asyncio.wait_for(results.get(), BOUND)
    return finished.outcome()


async def submit_to_executor_from_loop(executor: Executor, value: Any) -> Any:
    """Submit ``echo(value)`` to ``executor`` from a coroutine on the executor's own loop."""
    future = executor.submit(echo, value)
    return await asyncio.wait_for(asyncio.wrap_future(future), BOUND)
