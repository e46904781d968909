"""The embedded mode's broker and worker host: child processes that watch a pipe from us.

Each is ``python -m taskplex_zmq broker|worker ... --watch-stdin``: when this process closes
their stdin, or dies (even by SIGKILL), they read end of file and stop by themselves; one that
does not within STOP_GRACE seconds is killed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from taskplex.errors import BackendError

__all__ = ["EMBEDDED_PREFETCH", "START_TIMEOUT", "STOP_GRACE", "LocalProcesses"]

START_TIMEOUT = 60.0
"""Seconds the local broker and worker host may take to start, or a broker to answer."""
STOP_GRACE = 5.0
"""Seconds local processes get to exit after their pipe closed, before SIGKILL."""
EMBEDDED_PREFETCH = 256
"""Most tasks the embedded broker and worker host hold beyond those running."""


class LocalProcesses:
    """The embedded mode's broker and worker host, child processes watching a pipe from us."""

    def __init__(self, broker: subprocess.Popen[bytes], address: str, worker_command: list[str]) -> None:
        self.broker = broker
        self.address = address
        self._worker_command = worker_command
        self.worker = self._start_worker()
        self._started_at = time.monotonic()

    @classmethod
    def start(cls, workers: int, heartbeat: float, liveness: int) -> LocalProcesses:
        timing = ["--heartbeat", repr(heartbeat), "--liveness", str(liveness), "--log-level", "ERROR"]
        command = [sys.executable, "-m", "taskplex_zmq"]
        broker = subprocess.Popen(
            [
                *command,
                "broker",
                "--bind",
                "tcp://127.0.0.1:*",
                "--watch-stdin",
                "--print-address",
                *timing,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_environment(),
        )
        assert broker.stdout is not None
        line = broker.stdout.readline().decode().strip()
        broker.stdout.close()
        if not line.startswith("tcp://"):
            _end(broker)
            raise BackendError(f"the local broker did not start (status {broker.poll()}): {line!r}")
        worker_command = [
            *command,
            "worker",
            "--connect",
            line,
            "--processes",
            str(workers),
            "--prefetch",
            str(EMBEDDED_PREFETCH),
            "--watch-stdin",
            *timing,
        ]
        try:
            return cls(broker, line, worker_command)
        except BaseException:
            _end(broker)
            raise

    def _start_worker(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self._worker_command, stdin=subprocess.PIPE, env=_child_environment())

    def young(self) -> bool:
        return time.monotonic() - self._started_at < START_TIMEOUT

    def restart_worker(self) -> None:
        _end(self.worker)
        self.worker = self._start_worker()
        self._started_at = time.monotonic()

    def stop(self) -> None:
        _end(self.worker)
        _end(self.broker)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Close the pipe the process watches (it exits by itself); SIGKILL it if it does not."""
    if process.stdin is not None and not process.stdin.closed:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _child_environment() -> dict[str, str]:
    """This environment, with this process's import path, so that workers import what it can."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    return env
