"""Helpers of the hpc backend's tests: bounded waits and Slurm side channels of the test's own."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import taskplex

BOUND = 90.0
"""Seconds any wait of these tests may take before the test fails instead of hanging."""

MakeExecutor = Callable[..., taskplex.Executor]


def wait_until(condition: Callable[[], bool], what: str, limit: float = BOUND) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {limit} s for {what}")
        time.sleep(0.05)


def run(argv: list[str]) -> str:
    """Run a Slurm command of the test's own (a side channel, not the backend)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def job_id_of(marker: Path) -> int:
    """The Slurm job id a task wrote into its ``.started`` marker."""
    wait_until(marker.exists, f"{marker.name}")
    wait_until(lambda: marker.read_text().split()[0:1] != [], f"{marker.name} to be written")
    return int(marker.read_text().split()[0])


def queued_job_ids(name_prefix: str) -> list[int]:
    lines = run(["squeue", "--noheader", "--format=%i|%j"]).splitlines()
    return [int(line.split("|")[0]) for line in lines if line.split("|")[1].startswith(name_prefix)]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (seen in /proc, not through the backend)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a killed daemon lingers as a zombie for a while
