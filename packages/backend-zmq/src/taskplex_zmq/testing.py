"""How the conformance suite runs the zmq backend here (its test providers, not production code).

:class:`EmbeddedProvider` is what the ``taskplex_test_provider`` hook returns: the embedded mode,
whose broker and worker host are children of the test process. :class:`DetachedProvider` runs
the detached mode: it starts one broker and one worker host (``python -m taskplex_zmq``) the first
time a server is made, shared by every server of the test class, as a site's pool would be; a
test module holds it with ``provider = DetachedProvider()`` and calls ``close()`` at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from taskplex.conformance.provider import Leftovers, LocalLeftovers, TestProvider
from taskplex.errors import BackendUnavailable

__all__ = ["DetachedProvider", "EmbeddedProvider", "PoolLeftovers"]

STOP_GRACE = 10.0


class EmbeddedProvider(TestProvider):
    """The embedded mode: broker and worker host are child processes on this machine, so the
    default side channels (kill a pid, this process's children) apply."""

    latency = 1.5
    """A task crosses two more processes than in a local pool."""

    def options(self, workdir: Path) -> dict[str, Any]:
        return {}


class DetachedProvider(TestProvider):
    """A broker and a worker host of ``processes`` task processes, shared by the servers made."""

    latency = 1.5

    def __init__(self, processes: int = 4, timing: tuple[str, ...] = ("--grace", "5")) -> None:
        self.max_workers = processes
        self._processes = processes
        self._timing = timing
        self._broker: subprocess.Popen[bytes] | None = None
        self._worker: subprocess.Popen[bytes] | None = None
        self.address = ""

    def options(self, workdir: Path) -> dict[str, Any]:
        if os.name != "posix":
            raise BackendUnavailable("the zmq backend's worker hosts need a POSIX system")
        if self._broker is None or self._broker.poll() is not None:
            self._start()
        assert self._worker is not None
        if self._worker.poll() is not None:
            raise BackendUnavailable(f"the worker host exited with status {self._worker.returncode}")
        return {"address": self.address}

    def _start(self) -> None:
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", "taskplex_zmq"]
        quiet = ["--log-level", "ERROR"]
        broker = subprocess.Popen(
            [
                *command,
                "broker",
                "--bind",
                "tcp://127.0.0.1:*",
                "--print-address",
                *quiet,
                *self._timing,
            ],
            stdout=subprocess.PIPE,
            env=environment,
        )
        assert broker.stdout is not None
        self.address = broker.stdout.readline().decode().strip()
        broker.stdout.close()
        self._broker = broker
        self._worker = subprocess.Popen(
            [*command, "worker", "--connect", self.address, "--processes", str(self._processes), *quiet],
            env=environment,
        )

    def pool(self) -> set[int]:
        """The pids of the shared pool: broker, worker host, and the host's own helpers and task
        processes (which the host replaces when a test kills one). A task's own children are not."""
        import psutil

        pids = set()
        for process in (self._broker, self._worker):
            if process is not None and process.poll() is None:
                pids.add(process.pid)
        if self._worker is not None:
            try:
                host = psutil.Process(self._worker.pid)
                for child in host.children():
                    pids.add(child.pid)
                    pids.update(grandchild.pid for grandchild in child.children())
            except psutil.NoSuchProcess:
                pass
        return pids

    def snapshot(self) -> Leftovers:
        return PoolLeftovers(self)

    def close(self) -> None:
        """Stop the broker and the worker host (and so every task process)."""
        for process in (self._worker, self._broker):
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._broker = self._worker = None


_PROCESS = re.compile(r"process (\d+) ")


class PoolLeftovers(Leftovers):
    """This process's leftovers (threads, file descriptors, processes), the pool's own excepted."""

    def __init__(self, provider: DetachedProvider) -> None:
        self._provider = provider
        self._local = LocalLeftovers()

    def remaining(self) -> list[str]:
        pool = self._provider.pool()
        left = []
        for line in self._local.remaining():
            found = _PROCESS.match(line)
            if found is not None and int(found.group(1)) in pool:
                continue
            left.append(line)
        return left
