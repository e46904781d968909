"""The task functions every benchmark runs, in one importable module.

Process pools pickle functions by reference, so their workers must be able to import this module:
``run.py`` puts this directory on ``PYTHONPATH`` for everything it starts.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def noop(x: int) -> int:
    """Return the argument: the per-task cost of a pool, and nothing else."""
    return x


async def async_noop(x: int) -> int:
    """The coroutine counterpart of :func:`noop`."""
    return x


def spin(iterations: int) -> int:
    """Keep one core busy for ``iterations`` rounds of a loop (see :func:`calibrate_spin`)."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def time_spin(iterations: int, calls: int) -> float:
    """Median seconds of one ``spin(iterations)`` call in this process."""
    durations = []
    for _ in range(calls):
        start = time.perf_counter()
        spin(iterations)
        durations.append(time.perf_counter() - start)
    durations.sort()
    return durations[len(durations) // 2]


def calibrate_spin(seconds: float) -> int:
    """How many ``spin`` iterations take about ``seconds`` here."""
    iterations = 10_000
    while time_spin(iterations, 3) < seconds / 4:
        iterations *= 2
    for _ in range(3):
        iterations = max(1, round(iterations * seconds / time_spin(iterations, 9)))
    return iterations


def block_until(gate: str, started_dir: str, timeout: float) -> None:
    """Hold a worker until the file ``gate`` exists, leaving a marker saying who was held.

    The marker is named after the process and thread, so the caller can tell that each worker holds
    one blocker. Gives up after ``timeout`` seconds so a failed benchmark cannot hang forever.
    """
    Path(started_dir, f"{os.getpid()}-{threading.get_ident()}").touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} did not appear within {timeout} s")
        time.sleep(0.01)
