"""Fixtures of the zmq backend's tests: detached brokers and worker hosts as real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

BOUND = 60.0
"""Seconds any wait of these tests may take before it fails (the machine may be busy)."""
HEARTBEAT = ["--heartbeat", "0.2", "--liveness", "5"]
"""Peers silent for a second count as gone: fast enough for tests, slow enough for a busy box."""
FAST = {"heartbeat": 0.2, "liveness": 5}
"""The same timing for clients."""


def wait_until(condition: Callable[[], object], what: str, timeout: float = BOUND) -> None:
    """Poll ``condition`` until it holds; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)


def python_path() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}


class Cluster:
    """A broker and worker hosts started with ``python -m taskplex_zmq``; stopped by pid at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []
        self.address = ""
        self.broker: subprocess.Popen[bytes] | None = None
        self._logs = 0

    def _start(self, *arguments: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
        self._logs += 1
        log = (self.directory / f"process{self._logs}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "taskplex_zmq", *arguments],
            stdout=stdout,
            stderr=log,
            env=python_path(),
        )
        log.close()
        process.log = self.directory / f"process{self._logs}.log"  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def start_broker(self, *extra: str) -> subprocess.Popen[bytes]:
        bind = self.address or "tcp://127.0.0.1:*"
        broker = self._start(
            "broker", "--bind", bind, "--print-address", *HEARTBEAT, *extra, stdout=subprocess.PIPE
        )
        assert broker.stdout is not None
        line = broker.stdout.readline().decode().strip()
        assert line.startswith("tcp://"), f"the broker did not start: {self.log(broker)}"
        self.address = line
        self.broker = broker
        return broker

    def start_worker(self, processes: int = 1, *extra: str) -> subprocess.Popen[bytes]:
        return self._start(
            "worker", "--connect", self.address, "--processes", str(processes), *HEARTBEAT, *extra
        )

    @staticmethod
    def log(process: subprocess.Popen[bytes]) -> str:
        return process.log.read_text(errors="replace")  # type: ignore[attr-defined, no-any-return]

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            try:
                process.wait(BOUND / 2)
            except subprocess.TimeoutExpired:
                kill_tree(process.pid)
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (the ones this test started, by pid)."""
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def gone(pids: list[int]) -> bool:
    """Whether none of ``pids`` is a live (non-zombie) process."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A broker (started) on loopback; start worker hosts with ``cluster.start_worker()``."""
    made = Cluster(tmp_path)
    try:
        made.start_broker()
        yield made
    finally:
        made.stop()
