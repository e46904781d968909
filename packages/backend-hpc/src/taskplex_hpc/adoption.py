"""What a server finds of earlier servers that died: results to collect and jobs to take over.

A client killed mid-run (SIGKILL, a rebooted login node) cannot cancel its jobs: those that were
running go on and write their results into the dead server's run directory. With a journal
(:mod:`taskplex.journal`), the re-run knows each task by its key; so each attempt's directory
holds its task's ``key`` next to its ``call``, and a server starting in the same ``workdir``
looks for the run directories of servers that are gone:

- A run directory is **stale** when nobody holds its ``lock``: every server holds the lock of its
  own (``flock``, released by the kernel when the server's process dies, however it dies; on
  NFS through the lock manager). The first server that takes the lock owns what is in it, so two
  servers starting at once never both collect the same result. Directories without a ``lock``
  (left by a server that was still starting) are left alone.
- A **finished** attempt (its ``result`` says the function returned) is collected: when the
  re-run launches a task with that key, the result is delivered without a job.
- A **running** attempt (the job had its go and is still in the queue) is taken over: the re-run
  waits for its result as for a job of its own, cancels it on cancel, and so on.
- Everything else of a stale run — jobs that never got their go, pilots, attempts without a
  key, failed attempts (a journal runs failed tasks again by default) — is cancelled at once,
  and the run directory is removed when the new server stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from taskplex_hpc import files

__all__ = ["RUN_PREFIX", "Adopted", "Stale", "collect", "find_stale", "hold_lock", "release"]

logger = logging.getLogger("taskplex.hpc")

RUN_PREFIX = "taskplex-"
"""Run directories are ``<workdir>/taskplex-<host>-<pid>-<random>``."""


@dataclass
class Adopted:
    """An attempt of a dead server that the re-run of its task can use instead of a new job."""

    directory: Path
    result: bytes | None = None
    """The pickled outcome of a finished attempt; None while its job still runs."""
    job_id: int | None = None
    """The attempt's own job, still in the queue (a running attempt)."""
    started: str = ""
    """What the job wrote to ``started``: its pid, host and job id."""


@dataclass
class Stale:
    """A run directory of a server that is gone, whose lock this server now holds."""

    directory: Path
    lock: int
    jobs: list[int] = field(default_factory=list)
    """Its jobs still in the queue."""


def hold_lock(run_directory: Path) -> int:
    """Create and take the lock of this server's own run directory; the descriptor to keep open."""
    fd = os.open(run_directory / files.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        # a filesystem without locks: no later server can take the lock either, so this run is
        # never taken for a dead one; it is just not collected from if it dies
        logger.warning(
            "%s cannot be locked (%s): if this server dies, its results are lost", run_directory, exc
        )
    return fd


def find_stale(workdir: Path, own: Path) -> list[Stale]:
    """The run directories in ``workdir`` whose server is gone; their locks are now held here."""
    stale = []
    try:
        names = sorted(os.listdir(workdir))
    except OSError:
        return []
    for name in names:
        directory = workdir / name
        if not name.startswith(RUN_PREFIX) or directory == own:
            continue
        try:
            fd = os.open(directory / files.LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not a run directory, or one whose server was still starting
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its server is alive (or another one just took it over)
            continue
        stale.append(Stale(directory, fd))
    return stale


def collect(stale: list[Stale], queued: dict[int, str]) -> tuple[dict[str, Adopted], list[int]]:
    """What can be adopted from ``stale`` runs, by task key, and the job ids to cancel.

    ``queued`` maps each job in the queue to its working directory (one squeue call).
    """
    adopted: dict[str, Adopted] = {}
    for run in stale:
        prefix = f"{run.directory}{os.sep}"
        run.jobs = [job_id for job_id, where in queued.items() if where.startswith(prefix)]
        own_job = {Path(queued[job_id]): job_id for job_id in run.jobs}
        for attempt in _attempt_directories(run.directory):
            found = _adoptable(attempt, own_job.get(attempt))
            if found is None:
                continue
            key, candidate = found
            if key not in adopted or adopted[key].result is None:
                adopted[key] = candidate  # a finished attempt is preferred to a running one
    # every job of a stale run goes, but the running attempts taken over (a running one of a key
    # that also finished elsewhere is not taken over either)
    keep = {candidate.job_id for candidate in adopted.values() if candidate.result is None}
    cancel = sorted(job_id for run in stale for job_id in run.jobs if job_id not in keep)
    return adopted, cancel


def _attempt_directories(run: Path) -> list[Path]:
    try:
        return [run / name for name in sorted(os.listdir(run)) if name.isdigit()]
    except OSError:
        return []


def _adoptable(directory: Path, job_id: int | None) -> tuple[str, Adopted] | None:
    """(key, what to adopt) for a keyed attempt that finished well or still runs, else None."""
    try:
        key = files.read_trusted(directory / files.KEY).decode()
    except (OSError, files.UntrustedFile, UnicodeDecodeError):
        return None  # no key: nothing could ever ask for it
    try:
        started = files.read_trusted(directory / files.STARTED).decode(errors="replace")
    except (OSError, files.UntrustedFile):
        started = ""
    try:
        result = files.read_trusted(directory / files.RESULT)
    except (OSError, files.UntrustedFile):
        result = None
    if result is not None:
        with contextlib.suppress(Exception):
            kind, _ = pickle.loads(result)  # the outer pair only: ("result" | "error", bytes)
            if kind == "result":
                return key, Adopted(directory, result=result, started=started)
        return None  # failed, or unreadable: the task runs again
    if job_id is not None and (directory / files.GO).exists():
        return key, Adopted(directory, job_id=job_id, started=started)
    return None  # it never got its go: it has not run, and is cancelled


def release(stale: list[Stale]) -> None:
    """Give up the locks of ``stale`` runs (after their directories were removed)."""
    for run in stale:
        with contextlib.suppress(OSError):
            os.close(run.lock)
