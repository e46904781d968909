"""Starting worker processes, learning how they ended, and ending them.

Three start methods, all giving a worker the two pipe ends it talks to the server through:

* ``spawn``: a fresh interpreter per worker (``python -c``), passed the fds;
* ``fork``: a fork of the server's own process (fast; inherits its state, threads excepted);
* ``forkserver``: a fork of the server's fork server (see :mod:`taskplex_mp.forkserver`).

None of them imports the caller's ``__main__`` module in the worker (functions defined there travel
by value), so a script needs no ``if __name__ == "__main__":`` guard for the workers' sake.

Each worker leads its own process group, so that stopping it also stops what its task started, and
so that a Ctrl-C in the terminal reaches the caller alone, which then stops the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from taskplex.errors import BackendUnavailable
from taskplex_mp._frames import EXITED, FORKED, HELLO, SIGNED, FrameReader
from taskplex_mp.forkserver import REQUEST
from taskplex_mp.worker import run_forked

__all__ = [
    "FDS_PER_WORKER",
    "MEMORY_PER_WORKER",
    "START_METHODS",
    "ForkServer",
    "Reaper",
    "check_capacity",
    "describe_exit",
    "fork_worker",
    "kill_group",
    "spawn_worker",
    "watch_exit",
]

START_METHODS: tuple[str, ...] = tuple(
    method
    for method, available in (
        ("spawn", True),
        # the fork server passes pipe ends over a Linux SEQPACKET socket
        ("forkserver", sys.platform.startswith("linux") and hasattr(socket, "SOCK_SEQPACKET")),
        ("fork", hasattr(os, "fork")),
    )
    if available
)

FDS_PER_WORKER = 3
"""File descriptors the server holds per worker: its two pipe ends and an exit watcher."""
FDS_SPARE = 64
"""File descriptors left for everything else the program opens."""
MEMORY_PER_WORKER = 12 * 2**20
"""Bytes a worker process takes at least (an interpreter that imported taskplex's worker)."""

ExitCallback = Callable[[int | None], None]
"""Called with the exit code (negative: the signal that ended it; None: not known)."""


def describe_exit(code: int | None) -> str:
    """How a process ended, in words."""
    if code is None:
        return "ended (its exit status is not known)"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = {
        "SIGKILL": " (killed from outside, for example by the out-of-memory killer)",
        "SIGSEGV": " (a segmentation fault)",
        "SIGBUS": " (a bus error)",
        "SIGABRT": " (aborted)",
    }.get(name, "")
    return f"was killed by {name}{hint}"


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``pid``, if any of it is left.

    Every process started here leads its group from the start (both parent and child set it), so
    the group is never missing while its leader lives.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _interpreter(code: str, *args: int) -> list[str]:
    # the same interpreter and flags (-X, -W, -O, ...) as this process, like multiprocessing
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-c", code, *map(str, args)]


def _popen(command: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL, process_group=0)


def spawn_worker(task_fd: int, result_fd: int) -> subprocess.Popen[bytes]:
    """Start a worker in a fresh interpreter."""
    code = "from taskplex_mp.worker import spawned; spawned()"
    return _popen(_interpreter(code, task_fd, result_fd, os.getpid()), (task_fd, result_fd))


def fork_worker(task_fd: int, result_fd: int, close_fds: list[int]) -> int:
    """Fork this process into a worker; return its pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        run_forked(task_fd, result_fd, parent, close_fds)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here, so that the group exists before the child runs
    return pid


def watch_exit(loop: asyncio.AbstractEventLoop, pid: int, on_exit: ExitCallback) -> None:
    """Call ``on_exit(code)`` on ``loop`` as soon as child ``pid`` ends; reaps it."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        thread = threading.Thread(
            target=_wait_in_thread, args=(loop, pid, on_exit), name=f"taskplex-mp-wait-{pid}"
        )
        thread.daemon = True
        thread.start()
        return

    def ended() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        on_exit(_reap(pid))

    loop.add_reader(pidfd, ended)


def _wait_in_thread(loop: asyncio.AbstractEventLoop, pid: int, on_exit: ExitCallback) -> None:
    code = _reap(pid)
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for this any more
        loop.call_soon_threadsafe(on_exit, code)


def _reap(pid: int) -> int | None:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored, say): the code is lost
        return None
    return os.waitstatus_to_exitcode(status)


_requests = itertools.count(1)
"""Fork request ids, unique across fork servers (a lost one is replaced while replies arrive)."""


class ForkServer:
    """The server side of a fork server: start it, ask it for workers, hear how they end."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_forked: Callable[[int, int], None],
        on_exited: Callable[[int, int], None],
        on_lost: Callable[[ForkServer], None],
    ) -> None:
        self._loop = loop
        self._on_forked = on_forked
        self._on_exited = on_exited
        self._on_lost = on_lost
        self._reader = FrameReader()
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[None] = loop.create_future()
        self._failure: str | None = None
        self.exited: asyncio.Future[int | None] = loop.create_future()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def launch(self, config: dict[str, Any]) -> None:
        """Start the fork server. Fork requests may be sent at once: it reads them once ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = "from taskplex_mp.forkserver import main; main()"
        with theirs:
            command = _interpreter(code, theirs.fileno(), os.getpid())
            self._process = _popen(command, (theirs.fileno(),))
        self._sock = ours
        ours.setblocking(False)
        ours.send(pickle.dumps(config, pickle.HIGHEST_PROTOCOL))
        self._loop.add_reader(ours.fileno(), self._on_readable)
        watch_exit(self._loop, self._process.pid, self._ended)

    async def ready(self, timeout: float) -> None:
        """Wait until the fork server runs; BackendUnavailable if it died or hangs on the way."""
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise BackendUnavailable(
                f"the fork server (pid {self.pid}) did not start within {timeout} s"
            ) from None
        if self._failure is not None:
            raise BackendUnavailable(self._failure)

    @property
    def alive(self) -> bool:
        """False once the fork server closed its socket (it is ending) or was closed."""
        return self._sock is not None

    def fork(self, task_fd: int, result_fd: int) -> int:
        """Ask for a worker with these pipe ends; return the request id FORKED will carry."""
        if self._sock is None:
            raise ConnectionError("the fork server has ended")
        request_id = next(_requests)
        socket.send_fds(self._sock, [REQUEST.pack(request_id)], [task_fd, result_fd])
        return request_id

    def close(self) -> None:
        """Tell the fork server to exit (it kills any worker it still has)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def kill(self) -> None:
        if self._process is not None and not self.exited.done():
            kill_group(self._process.pid)

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            for kind, token, payload in self._reader.feed(data):
                if kind == EXITED:
                    self._on_exited(token, SIGNED.unpack(payload)[0])
                elif kind == FORKED:
                    self._on_forked(token, SIGNED.unpack(payload)[0])
                elif kind == HELLO and not self._ready.done():
                    self._ready.set_result(None)

    def _ended(self, code: int | None) -> None:
        assert self._process is not None
        self._process.returncode = code
        self.close()
        if not self._ready.done():
            self._failure = (
                f"the fork server (pid {self._process.pid}) {describe_exit(code)} while "
                "starting; its error output, if any, is above (stderr)"
            )
            self._ready.set_result(None)
        self.exited.set_result(code)
        self._on_lost(self)


class Reaper:
    """The server side of :mod:`taskplex_mp.reaper`: tell it which process groups to kill if the
    server goes away; close it when the server stops (it exits then)."""

    def __init__(self) -> None:
        code = "from taskplex_mp.reaper import main; main()"
        self._process = subprocess.Popen(
            _interpreter(code),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # neither Ctrl-C nor the end of the caller's group reach it
        )
        assert self._process.stdin is not None
        self._pipe = self._process.stdin.fileno()
        os.set_blocking(self._pipe, False)

    @property
    def fd(self) -> int:
        """The server's end of the pipe; a forked worker must close it (or the reaper would wait
        for the worker's descendants too)."""
        return self._pipe

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if the server goes away while it exists."""
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        """Process group ``pgid`` is gone (the server killed it and reaped its leader)."""
        self._send(b"-%d\n" % pgid)

    def _send(self, line: bytes) -> None:
        with contextlib.suppress(OSError):  # a full pipe or a dead reaper: nothing to wait for
            os.write(self._pipe, line)

    def close(self, timeout: float) -> None:
        """End the reaper (every group it knows is gone by now); wait for it up to ``timeout``."""
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def check_capacity(workers: int) -> None:
    """Refuse a pool this machine cannot start, before anything starts, saying what limits it.

    The open-files limit is raised to its hard limit when that is what it takes.
    """
    import resource

    needed = workers * FDS_PER_WORKER + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and needed > soft:
        if hard == resource.RLIM_INFINITY or needed <= hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
                soft = needed
        if needed > soft:
            raise ValueError(
                f"workers={workers} needs about {needed} open files but this process may open "
                f"{soft} (`ulimit -n`, at most {hard} without privileges); raise the limit or use "
                f"at most {max(1, (soft - FDS_SPARE) // FDS_PER_WORKER)} workers"
            )
    processes_limit = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if processes_limit != resource.RLIM_INFINITY and workers >= processes_limit:
        raise ValueError(
            f"workers={workers} processes exceed this user's process limit ({processes_limit}, "
            "`ulimit -u`); use fewer workers"
        )
    available = _memory_available()
    if available is not None and workers * MEMORY_PER_WORKER > available:
        raise ValueError(
            f"workers={workers} processes need at least {workers * MEMORY_PER_WORKER >> 20} MB "
            f"but this machine has {available >> 20} MB available; use at most "
            f"{max(1, available // MEMORY_PER_WORKER)} workers"
        )


def _memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
