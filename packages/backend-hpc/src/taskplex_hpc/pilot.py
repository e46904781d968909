"""A pilot job: ``python -m taskplex_hpc.pilot QUEUE SLOTS WALLTIME IDLE`` runs many tasks in one
allocation.

The server writes each task's call into its attempt directory, as for a job of its own, and
drops a ticket for it into ``QUEUE`` (a directory of the run directory on the shared filesystem;
one per task shape, so that a pilot only takes tasks it was sized for). A ticket is named after
the attempt's directory and holds the seconds the task may need (its timeout or walltime; 0 when
unknown). The pilot claims a ticket by renaming it into a directory of its own — a rename
succeeds for exactly one pilot, so no task runs twice — and runs the attempt at once in a forked
child process, as a job of its own would (:func:`taskplex_hpc.job.run_attempt`: say it is
ready, wait for the server's go, run, write the result; a guard kills the child's process group
on abort). The go is what makes a task the server cancelled meanwhile never run, and what starts
its clock: the server sees the task running exactly when it runs.

Supervision: at most SLOTS children at once; a child that ends without writing a result (killed,
crashed) gets an ``exit`` file saying how it ended, which the server turns into WorkerLost.
Draining: a ticket whose time does not fit in what is left of WALLTIME (less a margin) is left
for another pilot, and when no ticket fits the pilot stops claiming, waits for its children and
exits before Slurm would end it. A pilot with no children and no ticket for IDLE seconds exits.

Nothing goes over the network: compute nodes only need the shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from taskplex_hpc import files
from taskplex_hpc.job import die_with, run_attempt

__all__ = ["DRAIN_MARGIN", "Pilot", "main"]

DRAIN_MARGIN = files.DRAIN_MARGIN
"""Seconds before the pilot's walltime at which it stops starting tasks of unknown length."""
POLL = 0.02


def main() -> NoReturn:
    if len(sys.argv) != 5:  # noqa: PLR2004 - the program and its four arguments
        print("usage: python -m taskplex_hpc.pilot QUEUE SLOTS WALLTIME IDLE", file=sys.stderr)
        sys.exit(2)
    queue = Path(sys.argv[1])
    # imported once here rather than in every forked task process
    import taskplex.remote_logging
    import taskplex.serialization  # noqa: F401

    code = Pilot(queue, int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])).run()
    os._exit(code)


class Pilot:
    """Claims tickets from ``queue`` and runs their attempts, ``slots`` at a time."""

    def __init__(self, queue: Path, slots: int, walltime: float, idle: float) -> None:
        self.queue = queue
        self.slots = slots
        self.started = time.monotonic()
        self.deadline = self.started + walltime - DRAIN_MARGIN
        self.idle = idle
        self.job_id = os.environ.get("SLURM_JOB_ID", str(os.getpid()))
        self.claimed = files.make_private_directory(queue.parent / f"{files.CLAIMED}{self.job_id}")
        self.children: dict[int, Path] = {}

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._terminate)
        last_busy = time.monotonic()
        draining = False
        while True:
            self._reap()
            now = time.monotonic()
            if not draining and len(self.children) < self.slots:
                draining = not self._claim(self.deadline - now)
            if self.children:
                last_busy = now
            elif draining or now - last_busy > self.idle or not self.queue.is_dir():
                return 0
            time.sleep(POLL)

    def _claim(self, remaining: float) -> bool:
        """Start attempts for free slots; False once no ticket can fit in ``remaining`` seconds."""
        try:
            # tickets are named after attempt ids; anything else is being written (.name.tmp)
            tickets = sorted((name for name in os.listdir(self.queue) if name.isdigit()), key=int)
        except FileNotFoundError:
            return False
        if remaining <= 0:
            self._drain()
            return False
        for ticket in tickets:
            if len(self.children) >= self.slots:
                break
            try:
                need = float(files.read_trusted(self.queue / ticket) or b"0")
            except (OSError, ValueError, files.UntrustedFile):
                continue  # claimed by another pilot meanwhile, or not a ticket of ours
            if need > remaining:
                # left for a pilot with more time: this one drains, and the server starts another
                self._drain()
                return False
            try:
                os.rename(self.queue / ticket, self.claimed / ticket)
            except FileNotFoundError:
                continue  # another pilot was first
            self._start(self.queue.parent / ticket)
        return True

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            files.touch(self.queue.parent / f"{files.DRAINING}{self.job_id}")

    def _start(self, directory: Path) -> None:
        pilot = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                die_with(pilot)
                os.chdir(directory)
                # the attempt's own output file, whose tail the server attaches to failures
                output = os.open(directory / files.OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(output, 1)
                os.dup2(output, 2)
                os.close(output)
                code = run_attempt(directory)
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(OSError, ValueError):
                        stream.flush()
            finally:
                os._exit(code)
        self.children[pid] = directory

    def _reap(self) -> None:
        for pid, directory in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self.children[pid]
            if not (directory / files.RESULT).exists():
                with contextlib.suppress(OSError):
                    files.write_atomically(directory / files.EXIT, _describe(status).encode())

    def _terminate(self, signum: int, frame: object) -> None:
        # scancel: the children go with their pilot (each leads its own process group)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        os._exit(128 + signum)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


if __name__ == "__main__":
    main()
