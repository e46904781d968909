"""How a job that ended without a result is reported: the scheduler's reason, not a guess.

A job that left the queue without writing its result ended for a reason Slurm recorded (learned
from ``scontrol show job`` or ``sacct -c``, never from squeue's silence). Each reason becomes an
infrastructure error that names it and the job id, and whether another attempt could help decides
whether the task's ``retries`` are spent on it:

=================  =====================  =========  ============================================
Slurm state        error                  retried    why
=================  =====================  =========  ============================================
NODE_FAIL          ``NodeFailed``         yes        the node died, not the task
PREEMPTED          ``JobPreempted``       yes        a higher-priority job took the node
BOOT_FAIL          ``NodeFailed``         yes        the node did not boot
TIMEOUT            ``JobTimedOut``        no         the same walltime would expire again
OUT_OF_MEMORY      ``JobOutOfMemory``     no         the same memory limit would be hit again
DEADLINE           ``JobTimedOut``        no         the job's deadline passed
CANCELLED          ``JobCancelled``       no         someone outside taskplex cancelled the job
FAILED             ``JobFailed``          yes        the job's process died (killed, crashed)
COMPLETED          ``ResultUnreadable``   no         it exited cleanly yet left no result
(no record)        ``WorkerLost``         yes        Slurm keeps no record of the job any more
=================  =====================  =========  ============================================

The error types are core's (:mod:`taskplex.errors`), so code that catches ``JobTimedOut`` works
with any scheduler backend. Each error also carries the :class:`JobEnd` on its ``job`` attribute
(read it with :func:`job_end`): ``job_end(error).state`` is Slurm's own word for the ending.
"""

from __future__ import annotations

from taskplex import (
    InfrastructureError,
    JobCancelled,
    JobFailed,
    JobKilled,
    JobOutOfMemory,
    JobPreempted,
    JobTimedOut,
    NodeFailed,
    ResultUnreadable,
    WorkerLost,
)
from taskplex_hpc.cluster import JobEnd

__all__ = ["RETRIED_STATES", "error_for", "job_end", "no_record"]

RETRIED_STATES = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "FAILED", "UNKNOWN"})
"""Job states after which another attempt could succeed."""

_ERROR_OF: dict[str, type[JobKilled]] = {
    "TIMEOUT": JobTimedOut,
    "DEADLINE": JobTimedOut,
    "OUT_OF_MEMORY": JobOutOfMemory,
    "NODE_FAIL": NodeFailed,
    "BOOT_FAIL": NodeFailed,
    "PREEMPTED": JobPreempted,
    "CANCELLED": JobCancelled,
}

_WHAT = {
    "TIMEOUT": "reached its time limit",
    "OUT_OF_MEMORY": "ran out of memory (it exceeded the memory it asked for)",
    "NODE_FAIL": "was ended because its node failed",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "could not start: its node failed to boot",
    "DEADLINE": "reached its deadline",
    "CANCELLED": "was cancelled outside taskplex",
}


def error_for(end: JobEnd, output: str) -> InfrastructureError:
    """The error for a job that ended as ``end`` without a result; ``output`` is its output tail."""
    said = f"\n--- the job's output (last lines) ---\n{output}" if output else ""
    detail = f"exit code {end.exit_code}" + (f", signal {end.signal}" if end.signal else "")
    if end.reason and end.reason not in ("None", "NonZeroExitCode"):
        detail += f", reason {end.reason}"
    error: InfrastructureError
    if end.state in _WHAT:
        kind = _ERROR_OF[end.state]
        error = kind(f"Slurm job {end.job_id} {_WHAT[end.state]} ({end.state}, {detail}){said}")
    elif end.state == "COMPLETED" and end.exit_code == 0:
        error = ResultUnreadable(
            f"Slurm job {end.job_id} completed but left no result (COMPLETED, {detail}){said}"
        )
    else:
        error = JobFailed(
            f"Slurm job {end.job_id} ended {end.state} before its task wrote a result ({detail}){said}"
        )
    _describe(error, end)
    return error


def no_record(job_id: int, output: str) -> InfrastructureError:
    """The error for a job that left the queue and that Slurm has no record of."""
    said = f"\n--- the job's output (last lines) ---\n{output}" if output else ""
    error = WorkerLost(
        f"Slurm job {job_id} left the queue without a result, and neither scontrol nor "
        f"sacct -c has a record of how it ended{said}"
    )
    _describe(error, JobEnd(job_id, "UNKNOWN", source="none"))
    return error


def job_end(error: BaseException) -> JobEnd | None:
    """The Slurm record of the job whose ending ``error`` reports, or None for other errors."""
    end = getattr(error, "job", None)
    return end if isinstance(end, JobEnd) else None


def _describe(error: InfrastructureError, end: JobEnd) -> None:
    # core's error types are final for backends, so the record and the retry decision travel on
    # the instance: the scheduler reads ``retryable`` from it
    error.retryable = end.state in RETRIED_STATES
    error.job = end  # type: ignore[attr-defined]
