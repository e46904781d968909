"""The spawn host: the process that spawns a server's worker ranks and relays between them and it.

MPI ends a whole job when one of its processes dies, and the process that spawned ranks is part
of their job: with both MPICH and Open MPI, a rank killed by a segmentation fault or the OOM
killer takes the spawning process with it. So in spawn mode that process is not the caller's but
this one, ``python -c "from taskplex_mpi.host import main; main()" FD PARENT_PID``, started by the
server: when a rank dies, the host and the other ranks go with it, the server sees the host end,
reports the lost attempts and starts a new host. The caller's process never initialises MPI.

Over the socket ``FD`` (frames of :mod:`taskplex_mpi._frames`), the server first sends the spawn's
settings; the host finds the right ``mpiexec`` (see :mod:`taskplex_mpi.spawning`), spawns and
answers READY, or UNAVAILABLE with the reason. Then it passes batches of orders to the ranks and
batches of their events back, as the server's link would in world mode, and exits once every rank
said STOPPED. If the server goes away, the host aborts the job (the ranks with it); it also dies
with the server's thread that started it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

from taskplex.errors import BackendUnavailable
from taskplex_mpi import spawning
from taskplex_mpi._frames import EVENTS, FAILED, READY, UNAVAILABLE, FrameReader, frame
from taskplex_mpi._protocol import ORDERS, SPAWN_REPLY_TAG, STOPPED

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["main"]

MAX_PAUSE = 1e-3
_PR_SET_PDEATHSIG = 1


def main() -> NoReturn:
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent_pid)
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)  # the ranks and the process manager must not hold it open
    reader = FrameReader()
    try:
        settings = _first_frame(sock, reader)
        ranks = _spawn(sock, settings)
    except (EOFError, OSError):
        os._exit(1)  # the server went away before the ranks were there
    if ranks is None:
        os._exit(0)
    try:
        _relay(sock, reader, ranks, settings["count"])
    except (EOFError, OSError):  # the server went away: the ranks must not outlive it
        ranks.Abort(1)
    ranks.Disconnect()
    os._exit(0)


def _first_frame(sock: socket.socket, reader: FrameReader) -> dict[str, Any]:
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError
        frames = reader.feed(data)
        if frames:
            settings: dict[str, Any] = frames[0]
            return settings


def _spawn(sock: socket.socket, settings: dict[str, Any]) -> MPI.Intercomm | None:
    try:
        launcher = spawning.find_launcher(settings["mpiexec"])
        spawning.prepare_environment(launcher)
    except BackendUnavailable as exc:
        sock.sendall(frame((UNAVAILABLE, str(exc))))
        return None
    try:
        ranks = spawning.spawn_workers(settings["python"], settings["count"])
    except Exception as exc:  # an MPI error: the server fails to start, saying why
        sock.sendall(frame((FAILED, "".join(traceback.format_exception_only(exc)).strip())))
        return None
    sock.sendall(frame((READY, f"{launcher.family} {launcher.version}", launcher.path)))
    return ranks


def _relay(sock: socket.socket, reader: FrameReader, ranks: MPI.Intercomm, count: int) -> None:
    from mpi4py import MPI

    status = MPI.Status()
    sending: list[MPI.Request] = []
    stopped: set[int] = set()
    pause = 0.0
    sock.setblocking(False)
    while True:
        busy = False
        for batch in _incoming(sock, reader):
            for rank, orders in batch:
                sending.append(ranks.isend(orders, dest=rank, tag=ORDERS))
            busy = True
        received = []
        while ranks.iprobe(source=MPI.ANY_SOURCE, tag=SPAWN_REPLY_TAG, status=status):
            source = status.Get_source()
            events = ranks.recv(source=source, tag=SPAWN_REPLY_TAG)
            received.append((source, events))
            if events and events[-1][0] == STOPPED:
                stopped.add(source)
        if received:
            sock.setblocking(True)
            sock.sendall(frame((EVENTS, received)))
            sock.setblocking(False)
            busy = True
        if sending:
            sending = [request for request in sending if not request.Test()]
        if len(stopped) == count and not sending:
            return
        if busy:
            pause = 0.0
        else:
            select.select([sock], [], [], pause)
            pause = min(pause * 1.25 or 1e-5, MAX_PAUSE)


def _incoming(sock: socket.socket, reader: FrameReader) -> list[Any]:
    """Every frame the server has sent so far (none if nothing arrived); EOFError once it left."""
    frames: list[Any] = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return frames
        if not data:
            raise EOFError
        frames += reader.feed(data)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the server's thread that started it ends (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
