"""How the conformance suite runs the hpc backend here (its test provider, not production code).

It needs a real Slurm reachable from this machine (``.ci/setup-slurm`` starts one): without one,
``options`` raises BackendUnavailable, which ``--taskplex-strict`` turns into a failure.

Side channels, none of them through the backend: jobs are found in Slurm's queue by the job-name
prefix unique to this provider; leftover files are whatever appeared in the work directories the
provider handed out; a task's worker is the job's process on this (single) node, killed by pid.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from typing import Any

from taskplex.conformance.provider import Leftovers, LocalLeftovers, TestProvider
from taskplex.errors import BackendUnavailable

__all__ = ["PackedSlurmProvider", "SlurmLeftovers", "SlurmProvider", "slurm_problem"]

COMMAND_TIMEOUT = 10.0


def _run(argv: list[str]) -> str:
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if completed.returncode != 0:
        raise OSError(completed.stderr.strip() or f"{argv[0]} exited with {completed.returncode}")
    return completed.stdout


def slurm_problem() -> str | None:
    """Why no Slurm can run jobs from here, or None if one can."""
    try:
        states = _run(["sinfo", "--noheader", "--format=%T"]).split()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo fails ({exc}); start a Slurm with .ci/setup-slurm"
    if not any(state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for state in states):
        return f"no Slurm node is up (node states: {states or 'none'})"
    return None


class SlurmProvider(TestProvider):
    """Servers on this machine's Slurm, with a short poll interval and a job-name prefix of its own."""

    latency = 3.0
    """A job is submitted, scheduled (Slurm ticks once a second) and starts an interpreter."""

    def __init__(self) -> None:
        self.job_name = f"tpc{secrets.token_hex(3)}"
        self._workdirs: list[Path] = []
        self._cpus: int | None = None

    @property
    def max_workers(self) -> int | None:  # type: ignore[override]
        """The CPUs of this Slurm's nodes: one-core jobs beyond them would wait in the queue."""
        if self._cpus is None:
            try:
                self._cpus = sum(int(n) for n in _run(["sinfo", "-N", "--noheader", "-o", "%c"]).split())
            except (OSError, subprocess.TimeoutExpired, ValueError):
                return None
        return self._cpus

    def options(self, workdir: Path) -> dict[str, Any]:
        problem = slurm_problem()
        if problem is not None:
            raise BackendUnavailable(problem)
        self._workdirs.append(workdir)
        return {
            "workdir": workdir,
            "interval": 0.1,
            "job_name": self.job_name,
            "result_grace": 2.0,
            "command_timeout": 20.0,
        }

    def snapshot(self) -> Leftovers:
        return SlurmLeftovers(self.job_name, list(self._workdirs))


class PackedSlurmProvider(SlurmProvider):
    """The same, with tasks packed into pilot jobs (``pack=True``)."""

    def options(self, workdir: Path) -> dict[str, Any]:
        return {
            **super().options(workdir),
            "pack": True,
            "pilot_walltime": 600,
            "pilot_idle": 5.0,
        }


class SlurmLeftovers(Leftovers):
    """Jobs named with the provider's prefix still in Slurm's queue, files that appeared in the
    provider's work directories, and this process's own leftovers (threads, descriptors)."""

    def __init__(self, job_name: str, workdirs: list[Path]) -> None:
        self._job_name = job_name
        self._workdirs = workdirs
        self._files_before = set(self._files())
        self._local = LocalLeftovers()

    def _files(self) -> list[Path]:
        return [entry for workdir in self._workdirs if workdir.exists() for entry in workdir.iterdir()]

    def remaining(self) -> list[str]:
        try:
            queue = _run(["squeue", "--noheader", "--format=%i|%j|%T"])
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [f"the queue cannot be read: {exc}"]
        left = [
            f"Slurm job {line}"
            for line in queue.splitlines()
            if line.split("|")[1:2] and line.split("|")[1].startswith(self._job_name)
        ]
        left += [f"file {path}" for path in self._files() if path not in self._files_before]
        return left + self._local.remaining()
