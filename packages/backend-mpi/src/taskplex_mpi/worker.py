"""A worker rank: obeys the server's orders, runs tasks, and reports what happened.

In spawn mode each spawned process runs :func:`main`, serves the one server
that spawned it and exits. In world mode ranks 1..N-1 of ``mpiexec -n N python -m taskplex_mpi``
serve one server after another, until the script on rank 0 ends.

A rank runs one task at a time, in its main thread. It reports STARTED just before it calls the
function and DONE when the function returned or raised, and it puts the DONE of one task and the
STARTED of the next in the same message, so a busy rank sends one message per task. While it waits
for orders it polls with a growing pause (up to a millisecond) instead of blocking inside MPI:
blocking receives spin at full speed in most MPI libraries, which would take the cores the other
ranks need.

A task of ``k`` ranks arrives as the same RUN order on each of its ranks, with the ranks' numbers:
they build a communicator of their own (``MPI_Comm_create_group``, collective over those ranks
only), each calls the function, and each reports its own outcome; the server decides the task's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from taskplex.remote_logging import apply_logger_levels, pack_record
from taskplex.serialization import dumps_exception, dumps_result, loads_call
from taskplex_mpi import _current
from taskplex_mpi._protocol import (
    CONFIGURE,
    DONE,
    EXIT,
    LEVELS,
    LOG,
    ORDERS,
    RUN,
    STARTED,
    STOP,
    STOPPED,
    USER_TMPDIR,
)

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["main", "serve", "wait_for_orders"]

MAX_PAUSE = 1e-3
"""Seconds: the longest pause between two looks for orders."""


def wait_for_orders(comm: MPI.Comm, source: int) -> list[tuple[Any, ...]]:
    """The next message of orders from ``source``, polled for with a growing pause."""
    pause = 0.0
    while not comm.iprobe(source=source, tag=ORDERS):
        if pause:
            time.sleep(pause)
        pause = min(pause * 1.25 or 1e-5, MAX_PAUSE)
    orders: list[tuple[Any, ...]] = comm.recv(source=source, tag=ORDERS)
    return orders


class _Replies:
    """Events for the server, sent in one message when :meth:`flush` is called (any thread)."""

    def __init__(self, comm: MPI.Comm, server: int, tag: int) -> None:
        self.comm = comm
        self.server = server
        self.tag = tag
        self.pending: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def send_now(self, event: tuple[Any, ...]) -> None:
        with self.lock:
            self.pending.append(event)
            self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            events, self.pending = self.pending, []
            self.comm.send(events, dest=self.server, tag=self.tag)


class _ForwardRecords(logging.Handler):
    """Sends every record a task logs to the server, which re-emits it through the caller's logging."""

    def __init__(self, replies: _Replies) -> None:
        super().__init__()
        self.replies = replies

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.replies.send_now((LOG, pack_record(record)))
        except Exception:
            self.handleError(record)


def serve(comm: MPI.Comm, world: MPI.Intracomm, server: int) -> str | None:
    """Obey the orders of the server at rank ``server`` of ``comm`` until it says STOP.

    ``world`` is the communicator the ranks of a multi-rank task are numbered in. Returns
    :data:`EXIT` if told to leave for good, else None.
    """
    orders = wait_for_orders(comm, server)
    if orders[0][0] != CONFIGURE:
        return EXIT
    _, sys_path, levels, reply_tag = orders[0]
    sys.path.extend(path for path in sys_path if path not in sys.path)
    apply_logger_levels(levels)
    replies = _Replies(comm, server, reply_tag)
    handler = _ForwardRecords(replies)
    root = logging.getLogger()
    root.addHandler(handler)
    where = f"rank {world.Get_rank()} (pid {os.getpid()} on {socket.gethostname()})"
    try:
        orders = orders[1:]
        while True:
            for order in orders:
                kind = order[0]
                if kind == RUN:
                    _run(replies, world, where, order)
                elif kind == LEVELS:
                    apply_logger_levels(order[1], levels)
                    levels = order[1]
                elif kind == STOP:
                    replies.send_now((STOPPED,))
                    return order[1] if len(order) > 1 else None
            if not comm.iprobe(source=server, tag=ORDERS):
                replies.flush()  # else the DONE goes with the next task's STARTED
            orders = wait_for_orders(comm, server)
    finally:
        root.removeHandler(handler)
        apply_logger_levels({}, levels)


def _run(replies: _Replies, world: MPI.Intracomm, where: str, order: tuple[Any, ...]) -> None:
    _, attempt_id, payload, group = order
    replies.send_now((STARTED, attempt_id, where))  # with the DONE of the task before, if any
    task_comm = _task_communicator(world, group, attempt_id)
    token = _current.communicator.set(task_comm)
    began = time.perf_counter()
    try:
        failed, data = _outcome(payload, task_comm)
    finally:
        _current.communicator.reset(token)
        if group is not None:
            with contextlib.suppress(Exception):
                task_comm.Free()
    with replies.lock:
        # sent with the next task's STARTED, or when no order is left to obey
        replies.pending.append((DONE, attempt_id, failed, data, time.perf_counter() - began))


def _task_communicator(
    world: MPI.Intracomm, group: tuple[int, ...] | None, attempt_id: int
) -> MPI.Intracomm:
    from mpi4py import MPI

    if group is None:
        return MPI.COMM_SELF
    ranks = world.group.Incl(list(group))
    try:
        return world.Create_group(ranks, tag=attempt_id % 32768)
    finally:
        ranks.Free()


def _outcome(payload: tuple[bytes, bytes], task_comm: MPI.Comm) -> tuple[bool, bytes]:
    try:
        function, args, kwargs = loads_call(*payload)
        result = function(*args, **kwargs)
    except BaseException as exc:  # the task's own failure, SystemExit and KeyboardInterrupt included
        size = task_comm.Get_size()
        if size > 1:
            exc.add_note(f"(raised on rank {task_comm.Get_rank()} of the task's {size} ranks)")
        return True, dumps_exception(exc)
    try:
        return False, dumps_result(result if task_comm.Get_rank() == 0 else None)
    except BaseException as exc:  # a SerializationError that names the result's type
        return True, dumps_exception(exc)


def _restore_user_tmpdir() -> None:
    """Give tasks the caller's ``TMPDIR``, not the spawn host's scratch directory (see _hostlink)."""
    user = os.environ.pop(USER_TMPDIR, None)
    if user is None:
        return
    if user:
        os.environ["TMPDIR"] = user
    else:
        os.environ.pop("TMPDIR", None)
    tempfile.tempdir = None  # in case something asked for it already


def main() -> None:
    """Entry point of a spawned worker rank: serve the server that spawned this job, then exit."""
    from mpi4py import MPI

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        sys.exit("taskplex_mpi.worker is started by the mpi backend's spawn, not by hand")
    _restore_user_tmpdir()
    try:
        serve(parent, MPI.COMM_WORLD, 0)
    finally:
        parent.Disconnect()


if __name__ == "__main__":
    main()
