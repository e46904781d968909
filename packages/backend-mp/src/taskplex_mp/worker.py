"""The worker process: runs the tasks it reads from its pipe, one at a time, and reports each.

Loop: take in every frame that has arrived (without waiting while there is work), drop revoked tasks
(reporting them SKIPPED), then write STARTED for the next task together with the outcome of the one
before in a single write, and run it. Between two tasks the worker always looks at its pipe first,
so a task the server revoked before it started never runs. When the server closes the pipe (or dies:
the pipe ends too), the worker exits without starting anything else.

A large argument is unpickled from the bytearray it was read into, and a large result is written
from its pickle: neither is copied on the way (:mod:`taskplex_mp._frames`).

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
from taskplex.serialization import dumps_exception, dumps_result, loads, loads_function
from taskplex_mp._frames import (
    CONFIG,
    ERROR,
    HELLO,
    LEVELS,
    LOG,
    READ_SIZE,
    RESULT,
    REVOKE,
    SIZE,
    SKIPPED,
    STARTED,
    TASK,
    Buffer,
    Frame,
    FrameReader,
    Payload,
    frame,
    outcome_frame,
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
        self.pending: deque[tuple[int, Payload]] = deque()
        self.config: dict[str, Any] | None = None
        self.levels: dict[str, int] = {}  # the caller's logger levels, as last told
        self.closed = False
        self._write_lock = threading.Lock()
        # poll, not select: spawned workers keep the caller's fd numbers, which may exceed 1024
        self._poller = select.poll()
        self._poller.register(task_fd, select.POLLIN)

    def send(self, *buffers: Buffer) -> None:
        """Write frames to the server; log records may come from the task's own threads."""
        with self._write_lock:
            write_all(self.result_fd, buffers)

    def configure(self) -> bool:
        """Apply the CONFIG frame and say HELLO; False if the server closed the pipe first."""
        while self.config is None:
            self.receive([], wait=True)
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
        apply_logger_levels(self.levels)  # LEVELS may have come in with CONFIG: self.levels is newest
        self.send(frame(HELLO, os.getpid()))
        return True

    def receive(self, out: list[bytes], *, wait: bool) -> None:
        """Take in the frames that have arrived; with ``wait``, block until some bytes do."""
        # ask first even when not waiting: most times nothing has come, and a read finding nothing
        # costs more (it raises)
        if not self._poller.poll(None if wait else 0):
            return
        while True:
            frames: list[Frame] = []
            try:
                count = self.reader.read(self.task_fd, frames)
            except BlockingIOError:
                return
            if not count:
                self.closed = True
                return
            for kind, token, payload in frames:
                if kind == TASK:
                    self.pending.append((token, payload))
                elif kind == REVOKE:
                    self.revoke(token, out)
                elif kind == LEVELS:
                    levels = loads(payload)
                    apply_logger_levels(levels, previous=self.levels)
                    self.levels = levels
                elif kind == CONFIG:
                    self.config = loads(payload)
                    self.levels = self.config["log_levels"]
            if count < READ_SIZE:
                return

    def revoke(self, token: int, out: list[bytes]) -> None:
        for index, (pending_token, _) in enumerate(self.pending):
            if pending_token == token:
                del self.pending[index]
                out.append(frame(SKIPPED, token))
                return
        # already run: its outcome was written before this frame was read

    def serve(self) -> None:
        out: list[bytes] = []
        pending = self.pending
        while True:
            if not pending and out:
                self.send(*out)
                out = []
            self.receive(out, wait=not pending)
            if self.closed:
                if out:
                    self.send(*out)
                return
            if not pending:
                continue
            token, payload = pending.popleft()
            out.append(frame(STARTED, token))
            self.send(*out)
            out = execute(token, payload)
            flush_output()


def execute(token: int, payload: Payload) -> list[bytes]:
    """Run one task; return its RESULT or ERROR frame, as buffers to write."""
    started = time.perf_counter()
    try:
        (length,) = SIZE.unpack_from(payload)
        start = SIZE.size + length
        arguments: bytes | memoryview
        if isinstance(payload, bytearray):  # a large frame's: views of it, not copies
            view = memoryview(payload)
            function_data, arguments = bytes(view[SIZE.size : start]), view[start:]
        else:
            function_data, arguments = payload[SIZE.size : start], payload[start:]
        function = loads_function(function_data)  # bytes: the functions loaded are cached by them
        args, kwargs = loads(arguments)
    except BaseException as exc:  # even SystemExit from an argument's unpickling fails the task only
        error = SerializationError(
            f"the worker (pid {os.getpid()}) could not unpickle the task: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return outcome_frame(ERROR, token, 0.0, dumps_exception(error))
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
    return outcome_frame(kind, token, time.perf_counter() - started, body)


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
