"""Task functions of the mpi backend's tests (importable by the worker ranks)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

POLL = 0.01


def where() -> tuple[int, str]:
    return os.getpid(), socket.gethostname()


def double(x: int) -> int:
    return 2 * x


def fail(message: str) -> None:
    raise ValueError(message)


def wait_for_file(path: str, bound: float = 120.0) -> str:
    """Wait until ``path`` exists (bounded), then return its content."""
    deadline = time.monotonic() + bound
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(POLL)
    return Path(path).read_text()


def touch_then_wait(started: str, gate: str) -> str:
    Path(started).write_text(str(os.getpid()))
    return wait_for_file(gate)


def ranks_of_task(x: int) -> dict[str, Any]:
    import taskplex_mpi

    comm = taskplex_mpi.comm()
    return {
        "size": comm.Get_size(),
        "gathered": comm.allgather((comm.Get_rank(), x * comm.Get_rank())),
        "pids": comm.allgather(os.getpid()),
    }


def raise_on_one_rank(failing_rank: int, directory: str) -> str:
    """One rank raises at once; the others wait (bounded) for a message it never sends."""
    import taskplex_mpi

    comm = taskplex_mpi.comm()
    if comm.Get_rank() == failing_rank:
        raise KeyError(f"rank {failing_rank} gives up")
    deadline = time.monotonic() + 120
    while not comm.iprobe(source=failing_rank):
        if os.path.exists(os.path.join(directory, "release")) or time.monotonic() > deadline:
            Path(directory, f"rank{comm.Get_rank()}.released").touch()
            return "released"
        time.sleep(POLL)
    return "unexpected message"


def sleep_then_mark(seconds_file: str, marker: str) -> str:
    """Wait for ``seconds_file``'s gate, then write ``marker``: a task that outlives its timeout."""
    wait_for_file(seconds_file)
    Path(marker).touch()
    return "finished"
