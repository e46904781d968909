"""The batch job: ``python -m taskplex_hpc.job DIRECTORY`` runs one attempt of one task.

It reads the call the server wrote to ``DIRECTORY/call``, says it is ready by writing
``started`` (its pid and host), and waits for the server's ``go``: the server writes it only if
the attempt is still wanted, so a task cancelled while its job waited in the queue or started up
never runs. It then runs the function and writes ``result`` (the pickled result, or the pickled
exception with its traceback) and exits. Log records go to ``log`` as they are emitted; ``print``
output goes to the job's output file, whose tail the server attaches to failures.

Everything is a file in the attempt's own directory on the shared filesystem, so the compute node
needs no network route back to the host the server runs on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from taskplex_hpc import files

__all__ = ["die_with", "main", "run_attempt", "watch_directory"]

POLL = 0.02
"""Seconds between looks for the server's go (and for abort, where inotify is missing)."""
_IN_ATTRIB, _IN_MOVED_TO, _IN_CREATE = 0x4, 0x80, 0x100
_PR_SET_PDEATHSIG = 1


def main() -> NoReturn:
    if len(sys.argv) != 2:  # noqa: PLR2004 - the program and its one argument
        print("usage: python -m taskplex_hpc.job DIRECTORY", file=sys.stderr)
        sys.exit(2)
    code = run_attempt(Path(sys.argv[1]))
    _flush_output()
    # at once: the task's work is over when its function returned, even if it left threads
    os._exit(code)


def run_attempt(directory: Path, *, guard: bool = True) -> int:
    """Run the attempt in ``directory``; the exit code of the job (0 once a result is written).

    ``guard=False`` where a supervisor of its own watches for ``abort`` and kills this process's
    group (a pilot job, for its workers), which spares a fork per task.
    """
    try:
        call: dict[str, Any] = pickle.loads(files.read_trusted(directory / files.CALL))
    except (OSError, files.UntrustedFile, pickle.UnpicklingError, EOFError) as exc:
        print(f"taskplex_hpc.job: cannot read {directory / files.CALL}: {exc}", file=sys.stderr)
        return 3
    sys.path.extend(path for path in call["sys_path"] if path not in sys.path)
    log_fd = os.open(directory / files.LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    handler = _forward_logs(log_fd, call["log_levels"])
    try:
        return _run_call(directory, call, guard)
    finally:
        # a pilot's worker goes on to other attempts: their records go to their own files
        logging.getLogger().removeHandler(handler)
        os.close(log_fd)


def _run_call(directory: Path, call: dict[str, Any], guard: bool) -> int:
    """Unpickle the call, say ready, wait for the go, run, write the result."""
    from taskplex.errors import SerializationError
    from taskplex.serialization import dumps_exception

    try:
        from taskplex.serialization import loads_call

        function, args, kwargs = loads_call(call["function"], call["arguments"])
    except BaseException as exc:  # even SystemExit from an argument's unpickling fails only the task
        error = SerializationError(
            f"job {os.environ.get('SLURM_JOB_ID', '?')} could not unpickle the task: "
            f"{type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        _write_outcome(directory, "error", dumps_exception(error))
        return 0
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    files.write_atomically(
        directory / files.STARTED, f"{os.getpid()} {socket.gethostname()} {job_id}".encode()
    )
    if not _wait_for_go(directory, call["server_silence"]):
        return 0  # withdrawn, or the server is gone: the function never runs
    guard_pid = _start_guard(directory) if guard else None
    try:
        kind, payload = _outcome(function, args, kwargs)
        _flush_output()  # before the result: the server reads the output's tail when it sees one
        _write_outcome(directory, kind, payload)
    finally:
        if guard_pid is not None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(guard_pid, signal.SIGKILL)
                os.waitpid(guard_pid, 0)
    return 0


def _start_guard(directory: Path) -> int:
    """Fork a process that kills this job's process group once the server asks (``abort``).

    The server also cancels the job with scancel, but that travels through the controller and
    the node's daemon; the guard stops the work as soon as the file appears (at once where the
    filesystem reports changes to a watcher, else within ``POLL``), processes the task started
    included. It sleeps in the kernel, so a task holding the interpreter lock cannot delay it.
    """
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # lead a group of our own (a session leader already does)
    job = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        die_with(job)
        _wait_for_file(directory, files.ABORT)
        # asked to, or the server removed the attempt's directory: it wants nothing of it now
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(1)  # never back into the job's code


def die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` ends (Linux), so no guard outlives its job."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the job died before the signal was armed


def _wait_for_file(directory: Path, name: str) -> bool:
    """Wait until ``directory/name`` exists (True) or the directory is gone (False).

    inotify wakes at once where the kernel sees the change; elsewhere (and as a backstop on
    network filesystems, whose remote changes inotify may miss) the file is looked for every POLL.
    """
    path = directory / name
    watch = watch_directory(directory)
    try:
        while not path.exists():
            if not directory.exists():
                return False
            if watch is None:
                time.sleep(POLL)
            else:
                select.select([watch], [], [], POLL)
                with contextlib.suppress(BlockingIOError):
                    os.read(watch, 4096)
        return True
    finally:
        if watch is not None:
            os.close(watch)


def watch_directory(directory: Path) -> int | None:
    """An inotify descriptor that wakes when a file appears in ``directory``, or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, bytes(directory), _IN_CREATE | _IN_MOVED_TO | _IN_ATTRIB) < 0:
            os.close(fd)
            return None
    except (OSError, AttributeError):
        return None
    return int(fd)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _wait_for_go(directory: Path, silence: float) -> bool:
    """Wait for the server's go; False if it aborts the attempt or has not been heard from (its
    heartbeat, the run directory's ``alive`` file, is older than ``silence`` seconds)."""
    go, abort = directory / files.GO, directory / files.ABORT
    alive = directory.parent / files.ALIVE
    # the go comes within a look of the server's: looked for soon, then less and less often
    # (an inotify watch would see it at once, but closing one costs milliseconds a task)
    pause = POLL / 16
    while not go.exists():
        if abort.exists() or not directory.is_dir():
            return False  # withdrawn: aborted, or its directory already removed
        try:
            quiet = time.time() - alive.stat().st_mtime
        except OSError:
            quiet = float("inf")  # the run directory is gone: the server stopped
        if quiet > silence:
            print(
                f"taskplex_hpc.job: the server is silent for {quiet:.0f} s; not running",
                file=sys.stderr,
            )
            return False
        time.sleep(pause)
        pause = min(POLL, pause * 1.5)
    return True


def _outcome(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, bytes]:
    from taskplex.serialization import dumps_exception, dumps_result

    try:
        result = function(*args, **kwargs)
    except BaseException as exc:  # the task's own failure, SystemExit and KeyboardInterrupt included
        return "error", dumps_exception(exc)
    try:
        return "result", dumps_result(result)
    except BaseException as exc:  # a SerializationError that names the result's type
        return "error", dumps_exception(exc)


def _write_outcome(directory: Path, kind: str, payload: bytes) -> None:
    files.write_atomically(
        directory / files.RESULT, pickle.dumps((kind, payload), pickle.HIGHEST_PROTOCOL)
    )


def _forward_logs(fd: int, levels: dict[str, int]) -> logging.Handler:
    from taskplex.remote_logging import apply_logger_levels

    handler = _RecordsToFile(fd)
    logging.getLogger().addHandler(handler)
    apply_logger_levels(levels)
    return handler


class _RecordsToFile(logging.Handler):
    """Appends every record to the attempt's log file, one frame each, for the server to re-emit."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        from taskplex.remote_logging import pack_record

        try:
            data = pack_record(record)
            with self._lock:
                files.append_frame(self._fd, data)
        except Exception:
            self.handleError(record)


if __name__ == "__main__":
    main()
