"""The server's end of a spawn host (:mod:`taskplex_mpi.host`): start it, talk to it, see it end.

Everything happens on the server's event loop and nothing blocks it: frames from the host are
read when its socket is readable, frames to it wait until the socket takes them, and the host's
end is watched with a pidfd (or a thread where there is none). Orders sent in one turn of the
loop travel in one frame.

Each host runs with ``TMPDIR`` set to a fresh directory of its own, removed once the host ended.
MPI's process managers keep their session files there (Open MPI's ``prte.<pid>`` directories,
MPICH's topology files) and leave them behind when they are killed, which is how a host always
ends. Left in the shared temporary directory they pile up, and a later Open MPI whose ``prte``
happens to get a recycled pid finds the stale files, cannot start its PMIx listener and fails
the spawn. The ranks get the user's ``TMPDIR`` back before they run a task (see
:data:`USER_TMPDIR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from taskplex import BackendError, BackendUnavailable
from taskplex_mpi._frames import EVENTS, FAILED, UNAVAILABLE, FrameReader, frame
from taskplex_mpi._protocol import STOP, USER_TMPDIR

__all__ = ["HOST_COMMAND", "HostLink", "describe_exit"]

HOST_COMMAND = "from taskplex_mpi.host import main; main()"
READ_SIZE = 1 << 16

Received = list[tuple[int, list[tuple[Any, ...]]]]


def describe_exit(code: int | None) -> str:
    """How a process ended, in words (``code`` as from ``os.waitstatus_to_exitcode``)."""
    if code is None:
        return "ended"
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class HostLink:
    """A running spawn host and its ``count`` worker ranks; create it with :meth:`start`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        sock: socket.socket,
        count: int,
        scratch: str,
    ) -> None:
        self.loop = loop
        self.pid = popen.pid
        self.ranks = list(range(count))
        self.mpi = ""
        """The MPI and mpiexec the host spawned with, once it is READY."""
        self.closing = False
        self.ended: asyncio.Future[int | None] = loop.create_future()
        """The host's exit code once it ended (negative: the signal that killed it)."""
        self.on_events: Callable[[Received], None] = lambda received: None
        self._popen = popen
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = FrameReader()
        self._messages: asyncio.Queue[Any] | None = asyncio.Queue()
        self._pending: list[tuple[int, list[tuple[Any, ...]]]] = []
        self._outbox = bytearray()
        self._reaped = False
        self._scratch = scratch
        sock.setblocking(False)
        loop.add_reader(self._fd, self._read)
        self._watch_exit()

    @classmethod
    async def start(cls, *, python: str, mpiexec: str | None, count: int, timeout: float) -> HostLink:
        """Start a host that spawns ``count`` ranks; BackendUnavailable or BackendError if not."""
        loop = asyncio.get_running_loop()
        scratch = tempfile.mkdtemp(prefix="taskplex-mpi-")
        environment = dict(os.environ, TMPDIR=scratch)
        environment[USER_TMPDIR] = os.environ.get("TMPDIR", "")
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen(
                [python, "-c", HOST_COMMAND, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                process_group=0,  # killing the group ends the host and MPI's process manager
                env=environment,
            )
        except BaseException:
            ours.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            theirs.close()
        link = cls(loop, popen, ours, count, scratch)
        link._write(frame({"count": count, "python": python, "mpiexec": mpiexec}))
        try:
            await link._await_ready(timeout)
        except BaseException:
            link.kill()
            await asyncio.shield(link.ended)
            raise
        return link

    async def _await_ready(self, timeout: float) -> None:
        assert self._messages is not None
        waiting = asyncio.ensure_future(self._messages.get())
        done, _ = await asyncio.wait(
            [waiting, self.ended], timeout=timeout, return_when="FIRST_COMPLETED"
        )
        if waiting not in done:
            waiting.cancel()
            if self.ended.done():
                raise BackendError(
                    f"the spawn host (pid {self.pid}) {describe_exit(self.ended.result())} before "
                    "its ranks were up; its error output went to stderr"
                )
            raise BackendError(
                f"spawning {len(self.ranks)} worker rank(s) did not finish within {timeout} s; the "
                "MPI may not allow spawning here (a batch system that forbids it, too few slots): "
                "run under mpiexec instead (mpiexec -n N python -m taskplex_mpi script.py), or "
                "raise spawn_timeout"
            )
        kind, *details = waiting.result()
        if kind == UNAVAILABLE:
            raise BackendUnavailable(details[0])
        if kind == FAILED:
            raise BackendError(f"spawning {len(self.ranks)} worker rank(s) failed: {details[0]}")
        self.mpi = f"{details[0]} ({details[1]})"
        self._messages = None  # from now on, events go to on_events as they arrive

    # ------------------------------------------------------------------ talking

    def send(self, rank: int, orders: list[tuple[Any, ...]]) -> None:
        """Send ``orders`` to ``rank``; orders sent in one turn of the loop go in one frame."""
        if not self._pending:
            self.loop.call_soon(self._flush)
        self._pending.append((rank, orders))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._write(frame(pending))

    def _write(self, data: bytes) -> None:
        if self.ended.done():
            return
        if self._outbox:
            self._outbox += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the host is gone; its end is on its way
        if sent < len(data):
            self._outbox += data[sent:]
            self.loop.add_writer(self._fd, self._drain)

    def _drain(self) -> None:
        try:
            sent = self._sock.send(self._outbox)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._outbox)
        del self._outbox[:sent]
        if not self._outbox:
            self.loop.remove_writer(self._fd)

    def _read(self) -> bool:
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self._fd)
            return False
        for message in self._reader.feed(data):
            if self._messages is not None:
                self._messages.put_nowait(message)
            elif message[0] == EVENTS:
                self.on_events(message[1])
        return True

    # ------------------------------------------------------------------ ending

    async def close(self, timeout: float) -> bool:
        """Tell every rank to stop and wait for the host to end; kill it after ``timeout``.

        Returns False if it had to be killed (a rank still ran a task).
        """
        self.closing = True
        for rank in self.ranks:
            self.send(rank, [(STOP,)])
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), timeout)
        except TimeoutError:
            self.kill()
            await asyncio.shield(self.ended)
            return False
        return True

    def kill(self) -> None:
        """Kill the host's process group: MPI ends its ranks with it."""
        if not self._reaped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def _watch_exit(self) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            threading.Thread(
                target=self._wait_in_thread, name=f"taskplex-mpi-host-{self.pid}", daemon=True
            ).start()
            return

        def readable() -> None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            self._exited()

        self.loop.add_reader(pidfd, readable)

    def _wait_in_thread(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._exited)

    def _exited(self) -> None:
        self.kill()  # MPI's process manager, if it outlived the host
        try:
            _, status = os.waitpid(self.pid, 0)
            code: int | None = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = None
        self._reaped = True
        self._popen.returncode = code
        while self._read():  # what it sent before it ended
            pass
        self.loop.remove_reader(self._fd)
        if self._outbox:
            self.loop.remove_writer(self._fd)
        self._sock.close()
        shutil.rmtree(self._scratch, ignore_errors=True)  # the process manager's session files
        self.ended.set_result(code)
