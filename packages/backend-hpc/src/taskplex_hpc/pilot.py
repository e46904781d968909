"""A pilot job: ``python -m taskplex_hpc.pilot QUEUE SLOTS WALLTIME IDLE`` runs many tasks in one
allocation.

The server writes each task's call into its attempt directory, as for a job of its own, and
drops a ticket for it into ``QUEUE`` (a directory of the run directory on the shared filesystem;
one per task shape, so that a pilot only takes tasks it was sized for). A ticket is named after
the attempt's directory and holds the seconds the task may need (its timeout or walltime; 0 when
unknown). The pilot claims a ticket by renaming it into a directory of its own — a rename
succeeds for exactly one pilot, so no task runs twice — and runs the attempt at once in a forked
child process, as a job of its own would (:func:`taskplex_hpc.job.run_attempt`: say it is
ready, wait for the server's go, run, write the result). The go is what makes a task the server
cancelled meanwhile never run, and what starts its clock: the server sees the task running
exactly when it runs. The server drops tickets ahead of free slots, so a slot that frees finds
its next ticket at once; what a packed task waits for is the go, for which the server looks
often while packed tasks come and go.

Supervision: at most SLOTS children at once, each leading a process group of its own. The pilot
sleeps in the kernel until a child ends (a pidfd per child), a ticket arrives (inotify on the
queue, where the filesystem reports it) or POLL passes; then it reaps, kills the group of any
child whose attempt has an ``abort`` file (or lost its directory), and claims tickets for free
slots. A child that ends without writing a result (killed, crashed) gets an ``exit`` file saying
how it ended, which the server turns into WorkerLost.
Draining: a ticket whose time does not fit in what is left of WALLTIME (less a margin) is left
for another pilot, and when no ticket fits the pilot stops claiming, waits for its children and
exits before Slurm would end it. A pilot with no children and no ticket for IDLE seconds exits.

Nothing goes over the network: compute nodes only need the shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from taskplex_hpc import files
from taskplex_hpc.job import die_with, run_attempt, watch_directory

__all__ = ["DRAIN_MARGIN", "Pilot", "main"]

DRAIN_MARGIN = files.DRAIN_MARGIN
"""Seconds before the pilot's walltime at which it stops starting tasks of unknown length."""
POLL = 0.02
"""Seconds between looks at the queue and the children's abort files, at the longest."""


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
        self.pidfds: dict[int, int] = {}
        """Child pid -> a descriptor that becomes readable when it ends (where Linux has them)."""
        self.killed: set[int] = set()
        self.watch = watch_directory(queue)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._terminate)
        last_busy = time.monotonic()
        draining = False
        while True:
            self._reap()
            self._stop_aborted()
            now = time.monotonic()
            hungry = not draining and len(self.children) < self.slots
            if hungry:
                draining = not self._claim(self.deadline - now)
                hungry = not draining and len(self.children) < self.slots
            if self.children:
                last_busy = now
            elif draining or now - last_busy > self.idle or not self.queue.is_dir():
                return 0
            self._wait(hungry)

    def _wait(self, hungry: bool) -> None:
        """Sleep until a child ends, a ticket may have arrived (if slots are free), or POLL."""
        descriptors = list(self.pidfds.values())
        if hungry and self.watch is not None:
            descriptors.append(self.watch)
        # a child without a pidfd, or a queue without inotify: POLL bounds the wait
        if descriptors:
            select.select(descriptors, [], [], POLL)
        else:
            time.sleep(POLL)
        if self.watch is not None:
            with contextlib.suppress(BlockingIOError):
                os.read(self.watch, 65536)

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
                # a group of its own, which the pilot kills on abort (with the task's processes)
                os.setpgid(0, 0)
                for descriptor in [*self.pidfds.values(), self.watch]:
                    if descriptor is not None:
                        os.close(descriptor)
                os.chdir(directory)
                # the attempt's own output file, whose tail the server attaches to failures
                output = os.open(directory / files.OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(output, 1)
                os.dup2(output, 2)
                os.close(output)
                code = run_attempt(directory, guard=False)
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(OSError, ValueError):
                        stream.flush()
            finally:
                os._exit(code)
        # also here: an abort may come before the child has made its group
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        self.children[pid] = directory
        with contextlib.suppress(OSError, AttributeError):  # Linux >= 5.3 has them
            self.pidfds[pid] = os.pidfd_open(pid)

    def _reap(self) -> None:
        for pid, directory in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self.children[pid]
            self.killed.discard(pid)
            pidfd = self.pidfds.pop(pid, None)
            if pidfd is not None:
                os.close(pidfd)
            if not (directory / files.RESULT).exists():
                with contextlib.suppress(OSError):
                    files.write_atomically(directory / files.EXIT, _describe(status).encode())

    def _stop_aborted(self) -> None:
        """Kill the process group of each child whose attempt the server aborted (or removed)."""
        for pid, directory in self.children.items():
            if pid in self.killed:
                continue
            if (directory / files.ABORT).exists() or not directory.is_dir():
                self.killed.add(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

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
