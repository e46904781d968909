"""The server's side of one worker process: start it, talk to it, kill it, learn how it ended.

A :class:`WorkerProcess` owns the process and the server's end of its socket pair, and moves bytes
without ever blocking the event loop: frames are handed to ``on_frame`` as they arrive, and bytes
the socket would not take yet wait until it is writable. What the frames mean is the backend's
business (:mod:`taskplex_subprocess.server`). When the process ends, whatever it wrote before is
read, its process group is killed (so nothing its task started survives it), and ``ended`` is
resolved with its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable

from taskplex_subprocess._wire import FrameBuffer

__all__ = ["WorkerProcess", "describe_exit"]

READ_SIZE = 1 << 16


def describe_exit(code: int | None) -> str:
    """How a process ended, in words (``code`` as from ``os.waitstatus_to_exitcode``)."""
    if code is None:
        return "ended (its exit status could not be read)"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


class WorkerProcess:
    """One worker process, running one attempt. Create it on the event loop's thread.

    That thread is the process's parent as far as the kernel's death signal is concerned
    (:func:`taskplex_subprocess.worker.die_with_parent`), and it lives as long as the server.
    """

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        loop: asyncio.AbstractEventLoop,
        on_frame: Callable[[WorkerProcess, int, bytes], None],
    ) -> None:
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen(
                [*command, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # its own process group: killing the group stops whatever the task started too
                process_group=0,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = popen.pid
        self.name = f"pid {popen.pid}"
        self.killed = False
        """Whether the server killed it (rather than it dying by itself)."""
        self.began = False
        """Whether its attempt was allowed to start (the backend sent GO)."""
        self.outcome: tuple[int, bytes] | None = None
        """The RESULT or ERROR frame, once it arrived."""
        self.ended: asyncio.Future[int | None] = loop.create_future()
        self._popen = popen
        self._loop = loop
        self._sock = ours
        self._fd = ours.fileno()
        self._on_frame = on_frame
        self._frames = FrameBuffer()
        self._outbox = bytearray()
        self._sent = 0
        self._reaped = False
        ours.setblocking(False)
        loop.add_reader(self._fd, self._read)
        self._watch_exit()

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name}{' ended' if self.ended.done() else ''}>"

    def send(self, data: bytes) -> None:
        """Send ``data`` to the worker, now or as soon as its socket takes it."""
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
            return  # the worker is gone; its exit is on its way
        if sent < len(data):
            self._outbox += data[sent:]
            self._loop.add_writer(self._fd, self._flush)

    def kill(self) -> None:
        """Kill the worker and its process group with SIGKILL; ``ended`` follows."""
        self.killed = True
        self._kill_group()

    def _flush(self) -> None:
        try:
            with memoryview(self._outbox) as view:
                self._sent += self._sock.send(view[self._sent :])
        except BlockingIOError:
            return
        except OSError:
            self._sent = len(self._outbox)  # the worker is gone; its exit is on its way
        if self._sent >= len(self._outbox):
            self._loop.remove_writer(self._fd)
            self._outbox.clear()
            self._sent = 0

    def _read(self) -> bool:
        """Hand on the frames in one read; False if there was nothing to read (now, or ever)."""
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._fd)
            return False
        for kind, payload in self._frames.feed(data):
            self._on_frame(self, kind, payload)
        return True

    # ------------------------------------------------------------------ when it ends

    def _watch_exit(self) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux, or an old kernel: a thread waits instead
            threading.Thread(
                target=self._wait_in_thread, name=f"taskplex-subprocess-{self.pid}", daemon=True
            ).start()
            return

        def readable() -> None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
            self._exited()

        self._loop.add_reader(pidfd, readable)

    def _wait_in_thread(self) -> None:
        # WNOWAIT leaves it a zombie, so that its group id stays reserved until _exited kills it
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for it any more
            self._loop.call_soon_threadsafe(self._exited)

    def _exited(self) -> None:
        self._kill_group()  # what its task started and left behind
        self._finish(self._reap())

    def _kill_group(self) -> None:
        if self._reaped:
            return  # its group id may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _reap(self) -> int | None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped by someone else: the exit status is lost
            status = None
        self._reaped = True
        return None if status is None else os.waitstatus_to_exitcode(status)

    def _finish(self, code: int | None) -> None:
        while self._read():  # everything it wrote before it ended is in the socket by now
            pass
        self._loop.remove_reader(self._fd)
        if self._outbox:
            self._loop.remove_writer(self._fd)
        self._sock.close()
        self._popen.returncode = code  # reaped here; keeps Popen from warning that it still runs
        self.ended.set_result(code)
