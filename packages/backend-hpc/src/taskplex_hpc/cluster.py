"""The batch system as the backend sees it: submit, watch, learn how a job ended, cancel.

Submission, the queue status and deletion go through pysqa's ``QueueAdapter``, in either of its
modes: a configuration directory (``queue.yaml`` and a Jinja template per queue, or
``clusters.yaml``), or a queue type with a submission template. pysqa runs every scheduler
command through one function, which this module supplies, so that each command is bounded in
time (a ``squeue`` that hangs must not wedge the server) and counted (the benchmark reports how
many ``sbatch``, ``squeue``, ``scontrol`` and ``sacct`` calls a run cost).

What pysqa cannot say, this module asks Slurm itself: a job that left the queue has either
completed or been ended, and only ``scontrol show job`` (while Slurm remembers the job, MinJobAge)
or ``sacct -c`` (the job completion log) tell which, with the exit code and the reason. The
limits of the queue a job goes to are learned here too, so that a request beyond them is refused
at submit instead of being clamped by pysqa or left pending forever by Slurm.

Every method blocks: the backend calls them off the event loop, through ``run_blocking``.
"""

from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Cluster",
    "JobEnd",
    "JobSpec",
    "QueueLimits",
    "SchedulerCommandError",
    "SubmitFailed",
    "parse_memory_mb",
    "parse_slurm_time",
]

SUBMIT_ERROR_FILE = "pysqa.err"
"""Where pysqa leaves sbatch's message when a submission fails (in the job's directory)."""

# sbatch messages that say the controller could not be reached or was busy: the submission is
# tried again later rather than failing its task (slurmctld restarting must lose no task).
_TRANSIENT = (
    "unable to contact slurm controller",
    "socket timed out",
    "slurm temporarily unable",
    "resource temporarily unavailable",
    "connection refused",
    "transport endpoint",
    "timed out after",
    "slurm_persist_conn",
    "zero bytes were transmitted",
)


class SchedulerCommandError(RuntimeError):
    """A scheduler command (squeue, scontrol, sacct, scancel) failed or did not answer in time."""


class SubmitFailed(RuntimeError):
    """sbatch refused a job; ``message`` is what it said, ``transient`` whether to try again."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class JobSpec:
    """One job to submit: where it runs, what it runs and what it asks for."""

    name: str
    directory: Path
    command: str
    cores: int
    memory_mb: int | None
    walltime: float | None
    gpus: int


@dataclass(frozen=True)
class JobEnd:
    """How a job ended, as Slurm recorded it."""

    job_id: int
    state: str
    """COMPLETED, FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, CANCELLED, ..."""
    exit_code: int = 0
    signal: int = 0
    reason: str = ""
    source: str = "scontrol"
    """Which record said so: ``scontrol`` (the controller's memory) or ``sacct`` (the job log)."""


@dataclass(frozen=True)
class QueueLimits:
    """What one job may ask for in the queue it goes to; None where there is no limit."""

    queue: str
    cores_min: int | None = None
    cores_max: int | None = None
    memory_mb_max: int | None = None
    walltime_max: float | None = None
    source: str = ""
    """Where the limits come from, for error messages (queue.yaml, the Slurm partition)."""

    def problems(self, cores: int, memory_mb: int | None, walltime: float | None) -> list[str]:
        """Why a job with these requests cannot run in this queue (empty if it can)."""
        found = []
        if self.cores_max is not None and cores > self.cores_max:
            found.append(f"{cores} cores > the most a job may have ({self.cores_max})")
        if self.cores_min is not None and cores < self.cores_min:
            found.append(f"{cores} cores < the fewest a job may have ({self.cores_min})")
        if memory_mb is not None and self.memory_mb_max is not None and memory_mb > self.memory_mb_max:
            found.append(f"{memory_mb} MB of memory > the most a job may have ({self.memory_mb_max} MB)")
        if walltime is not None and self.walltime_max is not None and walltime > self.walltime_max:
            found.append(
                f"a walltime of {walltime:g} s > the queue's time limit ({self.walltime_max:g} s)"
            )
        return found


@dataclass
class _Counter:
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, command: str) -> None:
        with self.lock:
            self.calls[command] += 1


class Cluster:
    """A Slurm cluster reached through pysqa; every method blocks (call it off the loop)."""

    def __init__(
        self,
        *,
        queue_type: str,
        template: str | None,
        config_path: Path | None,
        cluster: str | None,
        queue: str | None,
        command_timeout: float,
    ) -> None:
        from jinja2 import Template
        from pysqa import QueueAdapter

        self.command_timeout = command_timeout
        self.queue = queue
        self._counter = _Counter()
        self._config_path = config_path
        self._template: Any = None
        if config_path is not None:
            self.adapter = QueueAdapter(directory=str(config_path), execute_command=self._execute)
            if cluster is not None:
                self.adapter.switch_cluster(cluster)
        else:
            self.adapter = QueueAdapter(queue_type=queue_type, execute_command=self._execute)
            self._template = Template(template or "")

    @property
    def directory_mode(self) -> bool:
        """Whether the queues and templates come from a pysqa configuration directory."""
        return self._config_path is not None

    @property
    def calls(self) -> dict[str, int]:
        """How many times each scheduler command ran (sbatch, squeue, scontrol, sacct, scancel)."""
        with self._counter.lock:
            return dict(self._counter.calls)

    # ------------------------------------------------------------------ running commands

    def _execute(
        self,
        commands: str | list[str],
        working_directory: str | None = None,
        split_output: bool = True,
        shell: bool = False,
        error_filename: str = SUBMIT_ERROR_FILE,
    ) -> str | list[str] | None:
        """pysqa's command runner, bounded and counted.

        As pysqa's own: a failing command with a working directory (a submission) leaves its
        output in ``error_filename`` there and returns None. Any other failure raises
        SchedulerCommandError, which pysqa would otherwise turn into a confusing parse error.
        """
        argv = commands if isinstance(commands, list) else commands.split()
        self._counter.count(os.path.basename(argv[0]) if argv else "?")
        try:
            completed = subprocess.run(
                argv,
                cwd=working_directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=self.command_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            message = f"`{' '.join(argv)}` timed out after {self.command_timeout:g} s"
            if working_directory is not None:
                _write_private(Path(working_directory) / error_filename, message)
                return None
            raise SchedulerCommandError(message) from exc
        except OSError as exc:
            message = f"`{' '.join(argv)}` could not run: {exc}"
            if working_directory is not None:
                _write_private(Path(working_directory) / error_filename, message)
                return None
            raise SchedulerCommandError(message) from exc
        if completed.returncode != 0:
            message = completed.stdout.strip() or f"exit code {completed.returncode}"
            if working_directory is not None:
                _write_private(Path(working_directory) / error_filename, message)
                return None
            raise SchedulerCommandError(f"`{' '.join(argv)}` failed: {message}")
        out = completed.stdout
        return out.split("\n") if split_output else out

    def run(self, argv: list[str]) -> str:
        """Run a scheduler command of this module's own (scontrol, sacct); its output."""
        out = self._execute(argv, split_output=False)
        assert isinstance(out, str)
        return out

    # ------------------------------------------------------------------ submit, watch, cancel

    def submit(self, spec: JobSpec, extra: Mapping[str, Any]) -> int:
        """Submit ``spec``; its Slurm job id. SubmitFailed says why sbatch refused it."""
        error_file = spec.directory / SUBMIT_ERROR_FILE
        arguments: dict[str, Any] = {
            "job_name": spec.name,
            "working_directory": str(spec.directory),
            "cores": spec.cores,
            "memory_max": None if spec.memory_mb is None else max(1, math.ceil(spec.memory_mb / 1024)),
            "run_time_max": None if spec.walltime is None else math.ceil(spec.walltime),
            "command": spec.command,
            # beyond pysqa's own variables, for templates that want them exactly
            "memory_mb": spec.memory_mb,
            "time_limit": None if spec.walltime is None else max(1, math.ceil(spec.walltime / 60)),
            "gpus": spec.gpus,
            **extra,
        }
        if self.directory_mode:
            arguments["queue"] = self.queue
        else:
            arguments["submission_template"] = self._template
        try:
            job_id = self.adapter.submit_job(**arguments)
        except SchedulerCommandError as exc:
            raise SubmitFailed(str(exc), transient=True) from exc
        except (ValueError, TypeError, KeyError) as exc:  # pysqa refused before calling sbatch
            raise SubmitFailed(f"pysqa refused the job: {exc}", transient=False) from exc
        if job_id is None:
            try:
                said = error_file.read_text().strip()
            except OSError:
                said = ""
            said = said or "sbatch failed and left no message"
            raise SubmitFailed(said, transient=any(marker in said.lower() for marker in _TRANSIENT))
        return int(job_id)

    def queued(self, job_ids: Iterable[int]) -> dict[int, str]:
        """The jobs among ``job_ids`` still in the queue, with their state (one squeue call)."""
        wanted = set(job_ids)
        frame = self.adapter.get_queue_status()
        if frame is None:
            raise SchedulerCommandError("pysqa returned no queue status")
        found: dict[int, str] = {}
        for job_id, status in zip(frame["jobid"], frame["status"], strict=True):
            if int(job_id) in wanted:
                found[int(job_id)] = str(status)
        return found

    def queued_named(self, prefix: str) -> dict[int, str]:
        """Every job in the queue whose name starts with ``prefix`` (one squeue call)."""
        frame = self.adapter.get_queue_status()
        if frame is None:
            raise SchedulerCommandError("pysqa returned no queue status")
        return {
            int(job_id): str(status)
            for job_id, name, status in zip(
                frame["jobid"], frame["jobname"], frame["status"], strict=True
            )
            if str(name).strip().startswith(prefix)
        }

    def working_directories(self) -> dict[int, str]:
        """Every job in the queue, with the directory it runs in (one squeue call)."""
        frame = self.adapter.get_queue_status()
        if frame is None:
            raise SchedulerCommandError("pysqa returned no queue status")
        return {
            int(job_id): str(directory)
            for job_id, directory in zip(frame["jobid"], frame["working_directory"], strict=True)
        }

    def cancel(self, job_ids: Sequence[int]) -> None:
        """Cancel these jobs: one through pysqa, many with one scancel call."""
        if not job_ids:
            return
        if len(job_ids) == 1:
            self.adapter.delete_job(job_ids[0])
            return
        self.run(["scancel", *(str(job_id) for job_id in job_ids)])

    def endings(self, job_ids: Iterable[int]) -> dict[int, JobEnd]:
        """How these jobs (gone from the queue) ended, where Slurm still knows.

        One ``scontrol show job`` call for all of them; one ``sacct -c`` call for those the
        controller has forgotten. Jobs neither knows are missing from the answer.
        """
        wanted = set(job_ids)
        if not wanted:
            return {}
        endings: dict[int, JobEnd] = {}
        try:
            shown = self.run(["scontrol", "show", "job", "--oneliner"])
        except SchedulerCommandError:
            shown = ""
        for line in shown.splitlines():
            end = _parse_scontrol_job(line)
            if end is not None and end.job_id in wanted and end.state not in _STILL_QUEUED:
                endings[end.job_id] = end
        missing = sorted(wanted - endings.keys())
        if missing:
            ids = ",".join(str(job_id) for job_id in missing)
            try:
                logged = self.run(
                    ["sacct", "-c", "-n", "-P", "-j", ids, "-o", "JobIDRaw,State,ExitCode"]
                )
            except SchedulerCommandError:
                logged = ""
            for line in logged.splitlines():
                end = _parse_sacct_line(line)
                if end is not None and end.job_id in wanted and end.job_id not in endings:
                    endings[end.job_id] = end
        return endings

    # ------------------------------------------------------------------ limits

    def limits(self) -> QueueLimits:
        """The limits of the queue jobs go to: from queue.yaml, or from the Slurm partition."""
        if self.directory_mode:
            return self._configured_limits()
        return self._partition_limits()

    def _configured_limits(self) -> QueueLimits:
        config = self.adapter.config or {}
        queue = self.queue or config.get("queue_primary")
        queues = config.get("queues") or {}
        if queue not in queues:
            raise ValueError(
                f"queue {queue!r} is not in the pysqa configuration (queues: {sorted(queues)})"
            )
        entry = queues[queue] or {}
        run_time = entry.get("run_time_max")
        return QueueLimits(
            queue=str(queue),
            cores_min=_int_or_none(entry.get("cores_min")),
            cores_max=_int_or_none(entry.get("cores_max")),
            memory_mb_max=parse_memory_mb(entry.get("memory_max"), plain_unit="G"),
            walltime_max=None if run_time is None else float(run_time),
            source=f"queue {queue!r} of {self._config_path}/queue.yaml",
        )

    def _partition_limits(self) -> QueueLimits:
        argv = ["scontrol", "show", "partition", "--oneliner"]
        if self.queue is not None:
            argv.append(self.queue)
        partitions = [_fields(line) for line in self.run(argv).splitlines() if line.strip()]
        if self.queue is None:
            partitions = [p for p in partitions if p.get("Default") == "YES"] or partitions[:1]
        if not partitions:
            raise ValueError(f"Slurm has no partition {self.queue or '(default)'}")
        partition = partitions[0]
        name = partition.get("PartitionName", self.queue or "")
        nodes = [
            _fields(line) for line in self.run(["scontrol", "show", "node", "--oneliner"]).splitlines()
        ]
        members = [node for node in nodes if name in node.get("Partitions", "").split(",")]
        cpus = [int(node["CPUTot"]) for node in members if node.get("CPUTot", "").isdigit()]
        memory = [int(node["RealMemory"]) for node in members if node.get("RealMemory", "").isdigit()]
        cores_max = max(cpus) if cpus else None
        per_node = _int_or_none(partition.get("MaxCPUsPerNode"))
        if per_node is not None and (cores_max is None or per_node < cores_max):
            cores_max = per_node
        memory_max = max(memory) if memory else None
        partition_memory = parse_memory_mb(partition.get("MaxMemPerNode"), plain_unit="M")
        if partition_memory is not None and (memory_max is None or partition_memory < memory_max):
            memory_max = partition_memory
        return QueueLimits(
            queue=name,
            cores_max=cores_max,
            memory_mb_max=memory_max,
            walltime_max=parse_slurm_time(partition.get("MaxTime", "UNLIMITED")),
            source=f"Slurm partition {name!r}",
        )


# ---------------------------------------------------------------------------------------------------
# parsing Slurm's answers
# ---------------------------------------------------------------------------------------------------

_STILL_QUEUED = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STOPPED"}
)
_SACCT_FIELDS = 3
_FIELD = re.compile(r"(\S+?)=(\S*)")


def _fields(line: str) -> dict[str, str]:
    return dict(_FIELD.findall(line))


def _exit_code(text: str) -> tuple[int, int]:
    code, _, signal = text.partition(":")
    return (int(code) if code.isdigit() else 0, int(signal) if signal.isdigit() else 0)


def _parse_scontrol_job(line: str) -> JobEnd | None:
    fields = _fields(line)
    job_id = fields.get("JobId", "")
    if not job_id.isdigit():
        return None
    code, signal = _exit_code(fields.get("ExitCode", "0:0"))
    return JobEnd(
        job_id=int(job_id),
        state=fields.get("JobState", "UNKNOWN"),
        exit_code=code,
        signal=signal,
        reason=fields.get("Reason", ""),
        source="scontrol",
    )


def _parse_sacct_line(line: str) -> JobEnd | None:
    parts = line.strip().split("|")
    if len(parts) < _SACCT_FIELDS or not parts[0].isdigit():  # steps (123.batch) are skipped
        return None
    state, _, by = parts[1].partition(" ")
    code, signal = _exit_code(parts[2])
    return JobEnd(int(parts[0]), state, code, signal, by.strip(), source="sacct")


def parse_slurm_time(text: str | None) -> float | None:
    """Seconds in a Slurm time limit ([D-]HH:MM:SS, MM:SS, minutes); None for UNLIMITED."""
    if text is None or text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [int(part) for part in text.split(":")]
    if len(parts) == 1:
        seconds = parts[0] * 60  # plain minutes
    elif len(parts) == 2:  # noqa: PLR2004 - MM:SS
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return float(days * 86400 + seconds)


_UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_memory_mb(value: object, plain_unit: str) -> int | None:
    """Megabytes in a memory amount (``4G``, ``500M``, or a number in ``plain_unit``)."""
    if value is None or value == "" or str(value).upper() in ("UNLIMITED", "0"):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * _UNITS[plain_unit])
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(value).upper())
    if match is None:
        raise ValueError(f"cannot read {value!r} as an amount of memory")
    return int(float(match[1]) * _UNITS[match[2] or plain_unit])


def _int_or_none(value: object) -> int | None:
    if value is None or str(value).upper() in ("UNLIMITED", ""):
        return None
    return int(str(value))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text + "\n")
