"""Interleaved measurements, each in a fresh process.

A benchmark compares candidates (taskplex and its peers) on the same job. Each measurement runs
one candidate's function in a new Python process (``measure.py``), so no candidate inherits another's
threads, heap or leftover workers, and the rounds are interleaved (A B C A B C ...) so that noise
from the rest of the machine falls on every candidate alike. After each measurement, processes the
candidate left running are counted, reported and stopped, so they cannot slow the next one down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = ["BENCH_DIR", "Candidate", "Config", "Measured", "NotInstalled", "run_interleaved"]

BENCH_DIR = Path(__file__).resolve().parent
MEASUREMENT_TIMEOUT = 300.0
LEFTOVER_GRACE = 5.0


class NotInstalled(Exception):
    """Raised by a candidate whose library (or taskplex backend) is not installed here."""


@dataclass(frozen=True)
class Config:
    """What the command line asked for."""

    quick: bool
    """Smaller sizes, for a smoke run."""
    repeats: int
    """Rounds of interleaved measurements; the median is reported."""
    backend: str
    """The taskplex backend the process-pool benchmarks run."""

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass(frozen=True)
class Candidate:
    """One contender in a benchmark: ``module:function`` called with ``kwargs`` in a new process."""

    label: str
    function: str
    kwargs: dict[str, Any]
    n: int
    """How many tasks one measurement runs (passed to the function as ``n``)."""
    note: str = ""


@dataclass
class Measured:
    """What the rounds of one candidate gave."""

    candidate: Candidate
    samples: list[Any] = field(default_factory=list)
    status: str = "ok"
    """``ok``, ``not installed`` or ``error``."""
    detail: str = ""
    leftovers: int = 0
    """Processes found still running after its measurements (and then stopped)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    def median(self, value: Callable[[Any], float] = float) -> float | None:
        """The median of ``value`` over the samples, or None if nothing was measured."""
        return statistics.median(value(s) for s in self.samples) if self.ok else None

    def why_not(self) -> str:
        """A short cell saying why there is no number (not installed, or the error)."""
        return f"{self.status}: {self.detail}"[:80]


def run_interleaved(bench: str, candidates: Iterable[Candidate], repeats: int) -> list[Measured]:
    """Measure every candidate ``repeats`` times, in rounds, one fresh process per measurement.

    A candidate that is not installed or fails is reported as such and left out of later rounds.
    """
    results = [Measured(candidate) for candidate in candidates]
    for round_number in range(1, repeats + 1):
        for measured in results:
            if measured.status != "ok":
                continue
            _measure_once(bench, measured, f"{round_number}/{repeats}")
    return results


def _measure_once(bench: str, measured: Measured, progress: str) -> None:
    candidate = measured.candidate
    with tempfile.TemporaryDirectory(prefix="taskplex-bench-") as scratch:
        output = Path(scratch, "result.json")
        kwargs = {**candidate.kwargs, "n": candidate.n}
        command = [
            sys.executable,
            str(BENCH_DIR / "measure.py"),
            candidate.function,
            json.dumps(kwargs),
            str(output),
        ]
        started = time.perf_counter()
        # A new session makes every process the candidate starts findable by its process group;
        # a scratch working directory keeps files that pools write out of the repository.
        child = subprocess.Popen(command, cwd=scratch, env=child_environment(), start_new_session=True)
        try:
            child.wait(MEASUREMENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        elapsed = time.perf_counter() - started
        measured.leftovers += _stop_leftovers(child.pid)
        if child.returncode == -signal.SIGKILL and not output.exists():
            measured.status, measured.detail = "error", f"no result within {MEASUREMENT_TIMEOUT} s"
        elif not output.exists():
            measured.status = "error"
            measured.detail = f"the measuring process exited with status {child.returncode}"
        else:
            report = json.loads(output.read_text())
            measured.status = report["status"]
            measured.detail = report.get("detail", "")
            if measured.status == "ok":
                measured.samples.append(report["sample"])
    shown = measured.status if measured.status != "ok" else f"done in {elapsed:.1f} s"
    print(f"[{bench}] round {progress}: {candidate.label} (n={candidate.n:,}): {shown}", file=sys.stderr)


def child_environment() -> dict[str, str]:
    """The environment of measuring processes: this directory importable, for every worker too."""
    env = dict(os.environ)
    paths = [str(BENCH_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _stop_leftovers(group: int) -> int:
    """Wait briefly for processes of ``group`` to end, then stop those that did not; count them."""
    deadline = time.monotonic() + LEFTOVER_GRACE
    while (pids := _members(group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        print(f"  stopped {len(pids)} process(es) left running: {pids}", file=sys.stderr)
    return len(pids)


def _members(group: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == group and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return members
