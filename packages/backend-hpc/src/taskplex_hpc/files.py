"""The files a server and its jobs share, in one directory per attempt on the shared filesystem.

Layout (each written once, atomically, by the side named)::

    <workdir>/taskplex-<host>-<pid>-<random>/      the server's run directory (0700)
        lock                                       held (flock) by the server while it lives
        <attempt>/                                 one attempt's directory (0700)
            call         server → job   the pickled call and the caller's configuration
            key          server         the task's key, when it has one (see adoption.py)
            started      job → server   "pid host": the job loaded the call and waits for go
            go           server → job   the attempt may start (attempt.started() said True)
            abort        server → job   stop the work now (the job also gets scancel)
            result       job → server   the pickled outcome: ("result" | "error", bytes)
            log          job → server   log records, appended as length-prefixed frames
            job.out      Slurm          the job's stdout and stderr
            run_queue.sh, pysqa.err     pysqa: the submission script, sbatch's complaint

Files are 0600 and directories 0700: other users of a cluster can read neither calls nor results.
A file appears complete or not at all (written to a temporary name, then renamed), so a reader
never sees half a pickle. Before unpickling, a reader checks that the file is a regular file (not
a link), owned by this user and writable by nobody else: nothing is unpickled from a file that
another user could have put there.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from pathlib import Path

__all__ = [
    "ABORT",
    "ALIVE",
    "CALL",
    "CLAIMED",
    "DRAINING",
    "DRAIN_MARGIN",
    "EXIT",
    "GO",
    "KEY",
    "LOCK",
    "LOG",
    "OUTPUT",
    "QUEUE",
    "RESULT",
    "STARTED",
    "LogReader",
    "UntrustedFile",
    "append_frame",
    "make_private_directory",
    "read_trusted",
    "tail",
    "touch",
    "write_atomically",
]

CALL = "call"
STARTED = "started"
GO = "go"
ABORT = "abort"
RESULT = "result"
LOG = "log"
KEY = "key"
LOCK = "lock"
OUTPUT = "job.out"
ALIVE = "alive"
"""The server's heartbeat in its run directory, touched every poll: jobs waiting for their go
give up when it goes stale (the server died), instead of holding their allocation."""
EXIT = "exit"
"""Packed: written by a pilot when an attempt's process ended without a result (how it ended)."""
QUEUE = "queue-"
"""Packed: prefix of the ticket directories in a run directory (one per task shape)."""
CLAIMED = "claimed-"
"""Packed: prefix of a pilot's directory of claimed tickets (followed by its Slurm job id)."""

DRAINING = "draining-"
"""Packed: a pilot that takes no more tasks leaves this marker (followed by its Slurm job id)."""
DRAIN_MARGIN = 10.0
"""Packed: seconds before a pilot's walltime at which it stops starting tasks."""

_FRAME = struct.Struct("<I")


class UntrustedFile(Exception):
    """A file that should hold a pickle is not one this user wrote; says why."""


def make_private_directory(path: Path) -> Path:
    """Create ``path`` (0700; parents as needed) and return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) so that readers see all of it or nothing.

    Not fsynced: the readers are other processes, which see the data once the file is closed
    (also on NFS, whose close flushes to the server), not a machine after a crash — an attempt
    whose node crashed is run again. An fsync would cost milliseconds on every packed task.
    """
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.rename(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def touch(path: Path) -> None:
    """Create the empty file ``path`` (0600), if its directory still exists."""
    with contextlib.suppress(FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))


def read_trusted(path: Path) -> bytes:
    """The bytes of ``path``, if this user wrote it; UntrustedFile or OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFile(f"{path} is not a regular file")
        if info.st_uid != os.getuid():
            raise UntrustedFile(f"{path} belongs to uid {info.st_uid}, not to this user")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedFile(f"{path} is writable by other users (mode {info.st_mode & 0o777:o})")
        return stream.read()


def append_frame(fd: int, payload: bytes) -> None:
    """Append one length-prefixed frame to the open file ``fd`` (opened with O_APPEND)."""
    os.write(fd, _FRAME.pack(len(payload)) + payload)


class LogReader:
    """Reads the frames appended to a log file so far, remembering where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read(self) -> list[bytes]:
        """The complete frames written since the last call (none if the file does not exist)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return []
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(stream.fileno())
            if info.st_uid != os.getuid() or info.st_size <= self._offset:
                return []
            stream.seek(self._offset)
            data = stream.read()
        frames = []
        position = 0
        while len(data) - position >= _FRAME.size:
            (length,) = _FRAME.unpack_from(data, position)
            start = position + _FRAME.size
            if len(data) - start < length:
                break
            frames.append(data[start : start + length])
            position = start + length
        self._offset += position
        return frames


def tail(path: Path, lines: int = 20, limit: int = 4096) -> str:
    """The last ``lines`` lines (at most ``limit`` bytes) of a text file; empty if unreadable."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(0, size - limit))
            data = stream.read()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
