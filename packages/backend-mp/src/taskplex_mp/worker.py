"""The worker process: runs the tasks it reads from its pipe, one at a time, and reports each.

Loop: take in every frame that has arrived (without waiting while there is work), drop revoked tasks
(reporting them SKIPPED), then write STARTED for the next task together with the outcome of the one
before in a single write, and run it. Between two tasks the worker always looks at its pipe first,
so a task the server revoked before it started never runs. When the server closes the pipe (or dies:
the pipe ends too), the worker exits without starting anything else.

Log records go to the server as they are emitted; print output goes to the inherited stdout and
stderr, flushed after each task so that nothing is lost if the worker is killed later.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from taskplex.errors import SerializationError
from taskplex.remote_logging import apply_logger_levels, pack_record
from taskplex.serialization import (
    dumps_exception,
    dumps_result,
    loads,
    loads_arguments,
    loads_function,
)
from taskplex_mp._frames import (
    CONFIG,
    ERROR,
    HELLO,
    LOG,
    READ_SIZE,
    RESULT,
    REVOKE,
    SECONDS,
    SIZE,
    SKIPPED,
    STARTED,
    TASK,
    FrameReader,
    frame,
    write_all,
)

__all__ = ["die_with_parent", "flush_output", "run", "run_forked", "spawned"]

_PR_SET_PDEATHSIG = 1


def spawned() -> None:
    """Entry point of a worker started as a fresh interpreter: ``-c`` with fds and parent pid."""
    task_fd, result_fd, parent_pid = (int(arg) for arg in sys.argv[1:4])
    sys.exit(run(task_fd, result_fd, parent_pid))


def run_forked(task_fd: int, result_fd: int, parent_pid: int, close_fds: list[int]) -> NoReturn:
    """Serve as a worker in a child just forked from ``parent_pid``; never returns.

    The child inherited its parent's file descriptors and signal set-up: ``close_fds`` are the
    parent's ends of other pipes (kept open here, they would hide the parent's death from other
    workers), and the parent's signal wake-up descriptor must not receive this process's signals.
    """
    code = 1
    try:
        os.setpgid(0, 0)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's stdin for its lifetime
        code = run(task_fd, result_fd, parent_pid)
    except BaseException:
        traceback.print_exc()
    finally:
        flush_output()
        os._exit(code)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux); exit if it already did.

    Elsewhere the end of the task pipe does the same job once the current task is over.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def run(task_fd: int, result_fd: int, parent_pid: int) -> int:
    """Serve tasks until the server closes the task pipe; return the exit code."""
    die_with_parent(parent_pid)
    os.set_blocking(task_fd, False)
    os.set_blocking(result_fd, True)
    worker = _Worker(task_fd, result_fd)
    if worker.configure():
        worker.serve()
    return 0


class _Worker:
    def __init__(self, task_fd: int, result_fd: int) -> None:
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.reader = FrameReader()
        self.pending: deque[tuple[int, bytes]] = deque()
        self.config: dict[str, Any] | None = None
        self.closed = False
        self._write_lock = threading.Lock()
        # poll, not select: spawned workers keep the caller's fd numbers, which may exceed 1024
        self._poller = select.poll()
        self._poller.register(task_fd, select.POLLIN)

    def send(self, data: bytes | bytearray) -> None:
        """Write frames to the server; log records may come from the task's own threads."""
        with self._write_lock:
            write_all(self.result_fd, data)

    def configure(self) -> bool:
        """Apply the CONFIG frame and say HELLO; False if the server closed the pipe first."""
        while self.config is None:
            self.receive(bytearray(), wait=True)
            if self.closed:
                return False
        sys.path[:] = self.config["sys_path"]
        import multiprocessing

        multiprocessing.current_process().authkey = self.config["authkey"]
        # whole lines reach the caller's stdout at once, and a killed task's output is not lost
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.addHandler(_ForwardLogs(self.send))
        apply_logger_levels(self.config["log_levels"])
        self.send(frame(HELLO, os.getpid()))
        return True

    def receive(self, out: bytearray, *, wait: bool) -> None:
        """Take in the frames that have arrived; with ``wait``, block until some bytes do."""
        if wait:
            self._poller.poll()
        while True:
            try:
                data = os.read(self.task_fd, READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                self.closed = True
                return
            for kind, token, payload in self.reader.feed(data):
                if kind == TASK:
                    self.pending.append((token, payload))
                elif kind == REVOKE:
                    self.revoke(token, out)
                elif kind == CONFIG:
                    self.config = loads(payload)
            if len(data) < READ_SIZE:
                return

    def revoke(self, token: int, out: bytearray) -> None:
        for index, (pending_token, _) in enumerate(self.pending):
            if pending_token == token:
                del self.pending[index]
                out += frame(SKIPPED, token)
                return
        # already run: its outcome was written before this frame was read

    def serve(self) -> None:
        out = bytearray()
        pending = self.pending
        while True:
            if not pending and out:
                self.send(out)
                out = bytearray()
            self.receive(out, wait=not pending)
            if self.closed:
                if out:
                    self.send(out)
                return
            if not pending:
                continue
            token, payload = pending.popleft()
            out += frame(STARTED, token)
            self.send(out)
            out = bytearray(execute(token, payload))
            flush_output()


def execute(token: int, payload: bytes) -> bytes:
    """Run one task; return its RESULT or ERROR frame."""
    started = time.perf_counter()
    try:
        (length,) = SIZE.unpack_from(payload)
        function = loads_function(payload[SIZE.size : SIZE.size + length])
        args, kwargs = loads_arguments(payload[SIZE.size + length :])
    except BaseException as exc:  # even SystemExit from an argument's unpickling fails the task only
        error = SerializationError(
            f"the worker (pid {os.getpid()}) could not unpickle the task: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return frame(ERROR, token, SECONDS.pack(0.0) + dumps_exception(error))
    try:
        result = function(*args, **kwargs)
    except BaseException as exc:  # the task's own failure, SystemExit included, ends only the task
        kind, body = ERROR, dumps_exception(exc)
    else:
        try:
            kind, body = RESULT, dumps_result(result)
        except SerializationError as exc:
            kind, body = ERROR, dumps_exception(exc)
        except BaseException as exc:  # SystemExit from a result's __reduce__, say
            error = SerializationError(f"cannot pickle the task's result: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            kind, body = ERROR, dumps_exception(error)
    return frame(kind, token, SECONDS.pack(time.perf_counter() - started) + body)


def flush_output() -> None:
    """Flush Python's stdout and stderr buffers (a killed process would lose them)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


class _ForwardLogs(logging.Handler):
    """Sends every record to the server, which re-emits it through the caller's logging."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(frame(LOG, 0, pack_record(record)))
        except Exception:
            self.handleError(record)
