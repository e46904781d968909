"""The worker process: ``python -m taskplex_subprocess.worker FD PARENT_PID`` runs one attempt.

It reads its configuration and the pickled call from the socket ``FD``, loads the call, says
READY and waits for ``GO``, so that nothing of the task runs unless the server still wants the
attempt. It then runs the function, sends the RESULT or ERROR frame and exits at once: the task's
work is over when the function returned, even if it left threads behind. Log records emitted
meanwhile travel as LOG frames; ``print`` output goes to the stdout and stderr it inherited.

The worker leads its own process group, which the server kills when the worker ends. If the server
itself dies, the worker goes too (the kernel's parent-death signal on Linux; elsewhere the end of
the connection, while it waits), and while the task runs a guard process of the group, waiting
for the connection to end, kills the whole group, processes the task started included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from taskplex.errors import SerializationError
from taskplex.remote_logging import apply_logger_levels, pack_record
from taskplex.serialization import dumps_exception, dumps_result, loads_call
from taskplex_subprocess._wire import ERROR, GO, LOG, READY, RESULT, frame

__all__ = ["die_with_parent", "main"]

_PR_SET_PDEATHSIG = 1


def main() -> NoReturn:
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent_pid)
    # processes the task starts must not hold the connection open after this one ended
    os.set_inheritable(fd, False)
    # EOFError, OSError: the server went away, and nobody is left to tell
    with contextlib.suppress(EOFError, OSError):
        _serve(_Channel(socket.socket(fileno=fd)))
    _exit()


def _serve(channel: _Channel) -> None:
    incoming = channel.sock.makefile("rb")
    _configure(pickle.load(incoming), channel)
    pickled_call = pickle.load(incoming)
    try:
        function, args, kwargs = loads_call(*pickled_call)
    except BaseException as exc:  # even SystemExit from an argument's unpickling fails only the task
        error = SerializationError(
            f"the worker (pid {os.getpid()}) could not unpickle the task: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        channel.send(ERROR, dumps_exception(error))
        return
    channel.send(READY)
    if incoming.read(1) == GO:  # else withdrawn before it began, or the server is gone
        guard = _start_guard(channel.sock)
        try:
            channel.send(*_outcome(function, args, kwargs))
        finally:
            # reaped here: where nobody adopts orphans (a container without an init), a guard
            # left to the server's kill of the group would stay a zombie
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(guard, signal.SIGKILL)
                os.waitpid(guard, 0)


def _start_guard(sock: socket.socket) -> int:
    """Fork a process that kills this process group as soon as the server's end of ``sock`` closes.

    The server sends nothing after GO and closes its end only after the group was killed, so the
    end comes first only if the server died: the kernel then kills this worker, but not what its
    task started. The guard sleeps in ``recv``, so a task holding the interpreter lock cannot
    delay it. Returns the guard's pid.
    """
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 12):
                pass
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(1)  # never back into the worker's code


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the thread that started it ends (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # no C library to ask
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed


class _Channel:
    """The worker's end of the connection; frames come from the task's threads too (logging)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, kind: int, payload: bytes = b"") -> None:
        with self._lock:
            self.sock.sendall(frame(kind, payload))


def _configure(config: dict[str, Any], channel: _Channel) -> None:
    # the caller's modules (its script's directory, test directories) are found here as well
    sys.path.extend(path for path in config["sys_path"] if path not in sys.path)
    logging.getLogger().addHandler(_ForwardRecords(channel))
    apply_logger_levels(config["log_levels"])


def _outcome(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, bytes]:
    try:
        result = function(*args, **kwargs)
    except BaseException as exc:  # the task's own failure, SystemExit and KeyboardInterrupt included
        return ERROR, dumps_exception(exc)
    try:
        return RESULT, dumps_result(result)
    except BaseException as exc:  # a SerializationError that names the result's type
        return ERROR, dumps_exception(exc)


def _exit() -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


class _ForwardRecords(logging.Handler):
    """Sends every record to the server, which re-emits it through the caller's logging."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._channel.send(LOG, pack_record(record))
        except Exception:
            self.handleError(record)


if __name__ == "__main__":
    main()
