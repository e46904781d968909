"""A pilot job: ``python -m taskplex_hpc.pilot QUEUE SLOTS WALLTIME IDLE`` runs many tasks in one
allocation.

The server writes each task's call into its attempt directory, as for a job of its own, and
drops a ticket for it into ``QUEUE`` (a directory of the run directory on the shared filesystem;
one per task shape, so that a pilot only takes tasks it was sized for). A ticket is named after
the attempt's directory and holds the seconds the task may need (its timeout or walltime; 0 when
unknown). The pilot claims a ticket by renaming it into a directory of its own — a rename
succeeds for exactly one pilot, so no task runs twice — and hands the attempt's directory to an
idle worker, a process the pilot forked once and keeps, as the mp backend keeps its workers. The
worker runs the attempt as a job of its own would (:func:`taskplex_hpc.job.run_attempt`: say it
is ready, wait for the server's go, run, write the result), with its output in the attempt's own
file, and reports back over a pipe. The go is what makes a task the server cancelled meanwhile
never run, and what starts its clock: the server sees the task running exactly when it runs. The
server drops tickets ahead of free slots, so a slot that frees finds its next ticket at once;
what a packed task waits for is the go, for which the server looks often while tasks come and go.

Supervision: at most SLOTS attempts at once, each worker leading a process group of its own. The
pilot sleeps in the kernel until a worker reports or dies (a pipe and a pidfd each), a ticket
arrives (inotify on the queue, where the filesystem reports it) or POLL passes; then it collects
reports, kills the group of any worker whose attempt has an ``abort`` file (or lost its
directory), and claims tickets for free slots. A killed worker is replaced by a fresh one when a
slot needs it. An attempt whose process ended without writing a result (killed, crashed) gets an
``exit`` file saying how it ended, which the server turns into WorkerLost.

Draining: a ticket whose time does not fit in what is left of WALLTIME (less a margin) is left
for another pilot, and when no ticket fits the pilot stops claiming, waits for its attempts and
exits before Slurm would end it. A pilot with no attempt and no ticket for IDLE seconds exits.

Nothing goes over the network: compute nodes only need the shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
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


@dataclass(eq=False)
class _Worker:
    """A process of the pilot that runs attempts one after another (forked once, kept)."""

    pid: int
    orders: int
    """Write end of a pipe: the directory of the next attempt to run."""
    reports: int
    """Read end of a pipe: the exit code of each attempt, once it is over."""
    pidfd: int | None
    """Readable once the process ended (where Linux has pidfds)."""
    directory: Path | None = None
    """The attempt it runs now."""
    killed: bool = False


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
        self.workers: dict[int, _Worker] = {}
        self.watch = watch_directory(queue)

    @property
    def busy(self) -> int:
        return sum(worker.directory is not None for worker in self.workers.values())

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._terminate)
        last_busy = time.monotonic()
        draining = False
        while True:
            self._collect()
            self._stop_aborted()
            now = time.monotonic()
            hungry = not draining and self.busy < self.slots
            if hungry:
                draining = not self._claim(self.deadline - now)
                hungry = not draining and self.busy < self.slots
            if self.busy:
                last_busy = now
            elif draining or now - last_busy > self.idle or not self.queue.is_dir():
                return 0
            self._wait(hungry)

    def _wait(self, hungry: bool) -> None:
        """Sleep until an attempt ends, a worker dies, a ticket may have arrived (if slots are
        free), or POLL passes (a worker without a pidfd, a queue without inotify)."""
        descriptors = [worker.reports for worker in self.workers.values() if worker.directory]
        descriptors += [worker.pidfd for worker in self.workers.values() if worker.pidfd is not None]
        if hungry and self.watch is not None:
            descriptors.append(self.watch)
        select.select(descriptors, [], [], POLL)
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
            if self.busy >= self.slots:
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
        idle = (w for w in self.workers.values() if w.directory is None and not w.killed)
        worker = next(idle, None) or self._fork_worker()
        worker.directory = directory
        with contextlib.suppress(OSError):  # it died idle; _collect writes the exit file
            os.write(worker.orders, os.fsencode(directory))

    def _fork_worker(self) -> _Worker:
        orders_read, orders = os.pipe()
        reports, reports_write = os.pipe()
        pilot = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                die_with(pilot)
                # a group of its own, which the pilot kills on abort (with the task's processes)
                os.setpgid(0, 0)
                os.close(orders)
                os.close(reports)
                for other in self.workers.values():
                    for descriptor in (other.orders, other.reports, other.pidfd):
                        if descriptor is not None:
                            os.close(descriptor)
                if self.watch is not None:
                    os.close(self.watch)
                _serve(orders_read, reports_write)
            finally:
                os._exit(1)
        os.close(orders_read)
        os.close(reports_write)
        # also here: an abort may come before the worker has made its group
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):  # Linux >= 5.3 has them
            pidfd = os.pidfd_open(pid)
        worker = _Worker(pid, orders, reports, pidfd)
        self.workers[pid] = worker
        return worker

    def _collect(self) -> None:
        """Take the reports of attempts that ended, and bury workers that died."""
        for worker in list(self.workers.values()):
            if worker.directory is not None:
                ready, _, _ = select.select([worker.reports], [], [], 0)
                if ready:
                    report = os.read(worker.reports, 64)
                    if report:
                        code = report.decode().strip()
                        self._over(worker.directory, f"gave up without a result (code {code})")
                        worker.directory = None
            try:
                done, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = worker.pid, 0
            if done == 0:
                continue
            del self.workers[worker.pid]
            for descriptor in (worker.orders, worker.reports, worker.pidfd):
                if descriptor is not None:
                    os.close(descriptor)
            if worker.directory is not None:
                self._over(worker.directory, _describe(status))

    def _over(self, directory: Path, how: str) -> None:
        """Say how an attempt's process ended, where it wrote no result."""
        if not (directory / files.RESULT).exists():
            with contextlib.suppress(OSError):
                files.write_atomically(directory / files.EXIT, how.encode())

    def _stop_aborted(self) -> None:
        """Kill the process group of each worker whose attempt the server aborted (or removed)."""
        for worker in self.workers.values():
            directory = worker.directory
            if directory is None or worker.killed:
                continue
            if (directory / files.ABORT).exists() or not directory.is_dir():
                worker.killed = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)

    def _terminate(self, signum: int, frame: object) -> None:
        # scancel: the workers go with their pilot (each leads its own process group)
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        os._exit(128 + signum)


def _serve(orders: int, reports: int) -> None:
    """A worker's life: run the attempt of each directory the pilot sends, report its end code."""
    while True:
        order = os.read(orders, 65536)
        if not order:
            return  # the pilot is done with it
        directory = Path(os.fsdecode(order))
        code = 1
        try:
            os.chdir(directory)
            # the attempt's own output file, whose tail the server attaches to failures
            output = os.open(directory / files.OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.close(output)
            code = run_attempt(directory, guard=False)
        except Exception as exc:  # its directory vanished: the server wants nothing of it now
            print(f"taskplex_hpc.pilot: {directory}: {exc}", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.write(reports, b"%d\n" % code)


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
