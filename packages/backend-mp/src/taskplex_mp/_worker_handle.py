"""The server's view of one worker process: its state, the tasks it holds, and its two pipes.

A :class:`WorkerHandle` owns the server's ends of the worker's pipes and moves bytes through them
without ever blocking the event loop: frames read from the worker wait in its ``inbox`` until the
server handles them, and buffers the task pipe would not take yet wait in its ``outbox`` until the
pipe is writable. Neither copies a large payload: one going out waits as a view of the bytes the
server sent, and one coming in is read into a bytearray of its own (:mod:`taskplex_mp._frames`).
Which frames to send and what the frames read mean is the server's business
(:mod:`taskplex_mp.server`); when the worker dies, the handle sorts the tasks it held into those it
failed and those it never touched, which go to other workers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections import deque

from taskplex.backend import Attempt
from taskplex.errors import TaskCancelled, WorkerLost
from taskplex_mp import processes
from taskplex_mp._frames import (
    READ_SIZE,
    Buffer,
    Frame,
    FrameReader,
    drop_written,
    write_once,
    write_some,
)

__all__ = ["DEAD", "KILLED", "READY", "RETIRING", "STARTING", "WorkerHandle"]

_READS_PER_CALL = 16

STARTING, READY, RETIRING, KILLED, DEAD = "starting", "ready", "retiring", "killed", "dead"


class WorkerHandle:
    """The server's view of one worker process."""

    __slots__ = (
        "budget",
        "cores",
        "current",
        "exited",
        "forkserver",
        "inbox",
        "loop",
        "name",
        "outbox",
        "pid",
        "popen",
        "queue",
        "reader",
        "result_fd",
        "revoking",
        "state",
        "task_fd",
        "victim",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task_fd: int, result_fd: int, budget: int | None
    ) -> None:
        self.loop = loop
        """The server's event loop, which watches the pipes."""
        self.task_fd = task_fd
        """The server's end of the pipe to the worker (non-blocking; -1 once closed)."""
        self.result_fd = result_fd
        """The server's end of the pipe from the worker (non-blocking; -1 once closed)."""
        self.state = STARTING
        self.pid: int | None = None
        self.name = "a starting worker"
        self.popen: subprocess.Popen[bytes] | None = None
        """Its Popen (start_method "spawn"); the server hands it the exit code its watcher reaped."""
        self.forkserver: processes.ForkServer | None = None
        """The fork server that forked it (start_method "forkserver")."""
        self.reader = FrameReader()
        self.inbox: deque[Frame] = deque()
        self.outbox: deque[Buffer] = deque()
        """Buffers the pipe would not take yet, in order; the first may be the unwritten end of one."""
        self.queue: dict[int, Attempt] = {}
        """Attempts handed to this worker and not yet reported, by id, in the order sent."""
        self.current: int | None = None
        """The token the worker reported STARTED and has not finished."""
        self.revoking: set[int] = set()
        self.victim: int | None = None
        """The token whose attempt this worker was killed to stop."""
        self.cores = 0
        """Worker slots this worker occupies while it has work (its task's cores), else 0."""
        self.budget = budget
        """Tasks it may still be given (max_tasks_per_child), or None."""
        self.exited: asyncio.Future[None] = loop.create_future()

    def __repr__(self) -> str:
        return f"<worker {self.name} {self.state} holding {len(self.queue)}>"

    # ================================================================== reading

    def read(self) -> bool:
        """Move the complete frames the worker has written into its inbox, without blocking.

        Reads at most _READS_PER_CALL times, so that one worker streaming a large result does not
        hold up the others; returns True if there may be more to read.
        """
        for _ in range(_READS_PER_CALL):
            if self.result_fd < 0:
                return False
            try:
                count = self.reader.read(self.result_fd, self.inbox)
            except BlockingIOError:
                return False
            except OSError:
                count = 0
            if not count:
                # the worker is exiting; its exit is reported by its watcher
                self.loop.remove_reader(self.result_fd)
                os.close(self.result_fd)
                self.result_fd = -1
                return False
            if count < READ_SIZE:
                return False
        return True

    # ================================================================== writing

    def send(self, *buffers: Buffer) -> None:
        """Write ``buffers`` to the worker in order; what the pipe will not take yet waits (uncopied)."""
        if self.task_fd < 0:
            return
        outbox = self.outbox
        if outbox:
            outbox.extend(buffers)
            return
        size = sum(map(len, buffers))
        try:
            written = write_once(self.task_fd, buffers, size)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the worker is gone; its exit is reported by its watcher
        if written < size:
            outbox.extend(buffers)
            drop_written(outbox, written)
            self.loop.add_writer(self.task_fd, self._flush)

    def _flush(self) -> None:
        outbox = self.outbox
        try:
            write_some(self.task_fd, outbox)
        except BlockingIOError:
            return
        except OSError:
            outbox.clear()  # the worker is gone; its exit is reported by its watcher
        if not outbox:
            self.loop.remove_writer(self.task_fd)
            if self.state is RETIRING and not self.queue:
                self.close_task_pipe(drop_outbox=False)

    def close_task_pipe(self, *, drop_outbox: bool) -> None:
        """End the worker's task pipe: it exits once it reads that (after any outbox bytes).

        With buffers still in the outbox, the pipe stays open (they are sent first) unless
        ``drop_outbox``, which the server sets when it is stopping.
        """
        if self.task_fd < 0 or (self.outbox and not drop_outbox):
            return
        self.loop.remove_writer(self.task_fd)
        os.close(self.task_fd)
        self.task_fd = -1
        self.outbox.clear()

    def close_pipes(self) -> None:
        if self.task_fd >= 0:
            self.loop.remove_writer(self.task_fd)
            os.close(self.task_fd)
            self.task_fd = -1
        if self.result_fd >= 0:
            self.loop.remove_reader(self.result_fd)
            os.close(self.result_fd)
            self.result_fd = -1

    # ================================================================== after it died

    def sort_held_tasks(
        self, previous: str, how: str
    ) -> tuple[list[tuple[Attempt, BaseException]], list[Attempt]]:
        """Split the attempts the dead worker held into those it ends, with their errors, and the rest.

        ``previous`` is the state it was in before it died and ``how`` says how it ended
        (:func:`taskplex_mp.processes.describe_exit`). The rest never started: they are given back.
        """
        settled: list[tuple[Attempt, BaseException]] = []
        innocent: list[Attempt] = []
        for token, attempt in self.queue.items():
            if token == self.victim or token in self.revoking:
                settled.append((attempt, TaskCancelled("its attempt was stopped")))
            elif token == self.current:
                if previous is KILLED:  # it began just as its worker was killed for another task
                    how = f"was killed to stop another task just as {attempt.task!r} began"
                lost = WorkerLost(f"the worker process running {attempt.task!r} ({self.name}) {how}")
                settled.append((attempt, lost))
            else:  # never started
                innocent.append(attempt)
        return settled, innocent
