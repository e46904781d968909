"""How the conformance suite provisions a backend and watches what it does, from the outside.

The suite never names a backend and never assumes that tasks run on this machine. Everything it
needs to know about where work runs comes from a :class:`TestProvider`, which lives with the
backend's test support (not on its production classes):

* ``options(workdir)``: the options of a server that runs here, or BackendUnavailable saying why;
* ``shared_directory(tmp_path)``: a directory the workers see, for the marker files tasks write;
* ``kill_worker(report)``: kill the worker that runs a task, given what the task reported about
  where it runs (pid, host);
* ``snapshot()`` / ``Leftovers.remaining()``: what the server left behind after it stopped
  (processes, threads, file descriptors, cluster jobs, files);
* ``latency``: how much slower than a local process pool the backend starts tasks; every time
  bound of the suite is multiplied by it; ``max_workers``: the most it can run at once here.

A backend distribution supplies its provider through the ``taskplex_test_provider`` hook, or a
backend author's test class sets ``provider``. The default suits backends whose workers are
processes or threads of the caller's own process on this machine.

This module imports nothing from pytest, so a provider can be written and tested on its own.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Leftovers", "LocalLeftovers", "TestProvider", "WorkerReport"]

# The standard library keeps these helper processes (and a pipe to each) for the life of the
# interpreter once any code uses multiprocessing; they are not workers of the server under test.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@dataclass(frozen=True)
class WorkerReport:
    """Where a task ran, as the task itself reported it (through a file in the shared directory)."""

    pid: int
    host: str


class Leftovers:
    """What a server left behind; ``remaining()`` describes each thing still there."""

    def remaining(self) -> list[str]:
        return []


class TestProvider:
    """Provision and observe one backend for the conformance suite; override what differs."""

    __test__ = False  # not a pytest test class, whatever its name

    latency: float = 1.0
    """How much slower than a local process pool the backend starts and ends tasks."""

    max_workers: int | None = None
    """The most attempts this machine (or test cluster) can run at once, if limited."""

    def options(self, workdir: Path) -> dict[str, Any]:
        """Options (besides ``workers`` and ``queue_size``) of a server that can run here.

        ``workdir`` is a fresh directory the server may use. Raise
        :class:`~taskplex.errors.BackendUnavailable` with the reason when the backend cannot run
        here (no scheduler reachable): the suite then skips it, saying why, or fails it in
        ``--taskplex-strict`` mode.
        """
        return {}

    def shared_directory(self, tmp_path: Path) -> Path:
        """A directory that both this process and the backend's workers can read and write."""
        return tmp_path

    def kill_worker(self, report: WorkerReport) -> None:
        """Kill the worker process that a task reported it runs in, as abruptly as possible."""
        if report.host != socket.gethostname():
            raise NotImplementedError(
                f"the task ran on host {report.host!r}; override kill_worker() to reach it"
            )
        if report.pid == os.getpid():
            raise AssertionError(
                "the task ran in the test's own process: a backend that runs tasks in the "
                "caller's process cannot declare survives_worker_death"
            )
        os.kill(report.pid, signal.SIGKILL)

    def snapshot(self) -> Leftovers:
        """Note what exists now, to tell later what the server under test left behind."""
        return LocalLeftovers()


class LocalLeftovers(Leftovers):
    """Child processes, threads and file descriptors of this process started since creation."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._children = {child.pid for child in self._me.children(recursive=True)}
        self._threads = set(threading.enumerate())
        self._fds = self._fd_count()
        self._helper_fds = _interpreter_helper_fds()

    def _fd_count(self) -> int | None:
        return self._me.num_fds() if hasattr(self._me, "num_fds") else None

    def remaining(self) -> list[str]:
        gc.collect()  # file descriptors of unreachable objects are closed by their finalisers
        psutil = self._psutil
        found = []
        for child in self._me.children(recursive=True):
            if child.pid in self._children:
                continue
            try:
                cmdline = " ".join(child.cmdline())
                status = child.status()
            except psutil.ZombieProcess:
                cmdline, status = "(exited, not reaped by its parent)", "zombie"
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                cmdline, status = "?", "?"
            if any(helper in cmdline for helper in _INTERPRETER_HELPERS):
                continue
            found.append(f"process {child.pid} ({status}): {cmdline[:200]}")
        found.extend(
            f"thread {thread.name!r}"
            for thread in threading.enumerate()
            if thread not in self._threads and thread.is_alive()
        )
        fds = self._fd_count()
        if fds is not None and self._fds is not None:
            extra = fds - self._fds - len(_interpreter_helper_fds() - self._helper_fds)
            if extra > 0:
                found.append(f"{extra} file descriptor(s) more than before")
        return found


def _interpreter_helper_fds() -> set[int]:
    """The pipes this process holds to the standard library's multiprocessing helpers."""
    fds = set()
    for module_name, holder, attribute in (
        ("multiprocessing.resource_tracker", "_resource_tracker", "_fd"),
        ("multiprocessing.forkserver", "_forkserver", "_forkserver_alive_fd"),
    ):
        module = sys.modules.get(module_name)
        fd = getattr(getattr(module, holder, None), attribute, None)
        if isinstance(fd, int):
            fds.add(fd)
    return fds
