"""Task functions for the mp backend's tests; importable by name in the worker processes.

They report what they did through files in a directory the test owns (never through the API under
test), and every wait in them is bounded.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from taskplex.conformance._tasks import record_run

BOUND = 30.0


def pid() -> int:
    return os.getpid()


def slow_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def hold(directory: str, name: str) -> int:
    """Write ``<name>.started`` (holding the pid), wait for ``<name>.release``, write ``.done``."""
    folder = Path(directory)
    record_run(folder, name)
    scratch = folder / f"{name}.tmp"
    scratch.write_text(str(os.getpid()))
    scratch.rename(folder / f"{name}.started")
    deadline = time.monotonic() + BOUND
    while not (folder / f"{name}.release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not released")
        time.sleep(0.01)
    (folder / f"{name}.done").touch()
    return os.getpid()


def mark(directory: str, name: str) -> str:
    """Count one run of ``name``; return the name."""
    record_run(Path(directory), name)
    return name


def runs(directory: str, name: str) -> int:
    return len(list(Path(directory).glob(f"{name}.run*")))


def die(how: str) -> None:
    """End the worker process abruptly, as ``how`` says."""
    if how == "exit":
        os._exit(3)
    elif how == "segfault":
        ctypes.string_at(0)
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(BOUND)


def log_failure(logger_name: str) -> None:
    try:
        raise ValueError("inner problem")
    except ValueError:
        logging.getLogger(logger_name).exception("task failed with %s", "details")


def accept(*args: object, **kwargs: object) -> int:
    return len(args) + len(kwargs)


def shout(text: str) -> str:
    print(text)
    return text


def return_lock() -> threading.Lock:
    return threading.Lock()


def start_grandchild(directory: str) -> int:
    """Start a long-lived process from the task, record its pid, and wait to be stopped."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    scratch = Path(directory) / "grandchild.tmp"
    scratch.write_text(str(child.pid))
    scratch.rename(Path(directory) / "grandchild.pid")
    time.sleep(BOUND)
    return child.pid


def _refuse_to_load(how: str) -> None:
    if how == "exit":
        raise SystemExit(4)
    raise ValueError("this result cannot be rebuilt here")


class Unloadable:
    """Pickles fine, but raises (or exits) whenever it is unpickled."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_refuse_to_load, (self.how,))


def return_unloadable(directory: str, how: str) -> Unloadable:
    record_run(Path(directory), "unloadable")
    return Unloadable(how)


def append_to(proxy: list[int], value: int) -> int:
    proxy.append(value)
    return len(proxy)


def start_sleeper(directory: str) -> None:
    """Start a long ``sleep`` as a task would start a solver, record its pid, and wait."""
    import subprocess

    sleeper = subprocess.Popen(["sleep", "300"])
    scratch = Path(directory) / "sleeper.tmp"
    scratch.write_text(str(sleeper.pid))
    scratch.rename(Path(directory) / "sleeper.pid")
    time.sleep(BOUND)


def echo_len(data: bytes) -> int:
    return len(data)


MEMORY_AT_LOAD: list[tuple[int, int]] = []
"""tracemalloc's (current, peak) in this process each time a :class:`MemoryProbe` was unpickled."""


def note_memory() -> None:
    MEMORY_AT_LOAD.append(tracemalloc.get_traced_memory())


class MemoryProbe:
    """Unpickles as ``None``, noting the memory of the process unpickling it at that moment."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (note_memory, ())


def make_probed(size: int) -> tuple[MemoryProbe, bytes]:
    """``size`` bytes, after a probe: it notes the caller's memory before they are unpickled."""
    return MemoryProbe(), b"x" * size


def log_debug(logger_name: str) -> None:
    logging.getLogger(logger_name).debug("debug from %s", logger_name)


def heavy_modules_loaded(_: object) -> list[str]:
    """Which of the modules a worker should not need are imported in this process."""
    heavy = ("taskplex.executor", "taskplex.scheduler", "taskplex.plugins", "sqlite3", "tqdm")
    return [name for name in heavy if name in sys.modules]
