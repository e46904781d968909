"""Task functions for the zmq backend's tests; importable by name in worker hosts' processes.

They report what they did through files in a directory the test owns, never through the API under
test, and every wait in them is bounded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

BOUND = 60.0


def noop(value: object = None) -> object:
    return value


def log_and_return(logger_name: str, value: int) -> int:
    """Log ``record <value>`` at WARNING on ``logger_name``; return ``value``."""
    logging.getLogger(logger_name).warning("record %d", value)
    return value


def hold(directory: str, name: str) -> int:
    """Append this process's pid to ``<name>.runs``, wait for ``<name>.release``, touch
    ``<name>.done``; return the pid."""
    folder = Path(directory)
    with (folder / f"{name}.runs").open("a") as runs:
        runs.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + BOUND
    while not (folder / f"{name}.release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was never released")
        time.sleep(0.01)
    (folder / f"{name}.done").touch()
    return os.getpid()


def runs(directory: str, name: str) -> list[int]:
    """The pids of the processes that ran ``hold(directory, name)``, in order."""
    path = Path(directory) / f"{name}.runs"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def release(directory: str, name: str) -> None:
    (Path(directory) / f"{name}.release").touch()


def done(directory: str, name: str) -> bool:
    return (Path(directory) / f"{name}.done").exists()


def nap(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value
