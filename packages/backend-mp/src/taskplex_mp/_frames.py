"""The wire format between the server and its worker processes: length-prefixed frames on pipes.

Every frame is a 13-byte header (payload length, kind, token) and the payload. Several frames are
written with one system call and a reader takes all it can in one read, so small tasks cost a few
bytes, not a system call each.

A large payload is not copied on its way through. Frames go out as a list of buffers written with
one system call, small ones joined first and large ones from where they are (``os.writev``): a
large TASK or outcome frame (:func:`task_frame`, :func:`outcome_frame`) keeps its header apart from
the pickles it carries. A frame of ``LARGE`` bytes or more is read straight from the pipe into a
bytearray of its size, which is the payload handed out (pickle loads from it as it is).

Server to worker: CONFIG (once, first), TASK (token = the attempt's token; payload = the function's
pickle length, the function, the arguments), REVOKE (do not start this task), LEVELS (the caller's
logger levels changed: a pickled dict of them). Closing the pipe tells the worker to exit.

Worker to server: HELLO (ready; token = pid), STARTED (token now executes), RESULT and ERROR (token
ended; payload = seconds it ran, then the pickled result or exception), SKIPPED (a revoked token
was dropped unstarted), LOG (a pickled log record).

Fork server to server: FORKED (token = request id, payload = pid), EXITED (token = pid, payload =
exit code); server to fork server: a fork request carries the new worker's two pipe ends.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import MutableSequence, Sequence
from itertools import islice
from typing import TypeAlias

__all__ = [
    "Buffer",
    "Frame",
    "FrameReader",
    "Payload",
    "drop_written",
    "frame",
    "outcome_frame",
    "task_frame",
    "write_all",
    "write_once",
    "write_some",
]

READ_SIZE = 1 << 16
"""Most bytes taken from a pipe in one read (a large frame's bytes excepted)."""
LARGE = READ_SIZE
"""Frames whose payload is this long or longer are written and read without copying it."""
IOV_MAX = 1024
"""Most buffers one ``os.writev`` takes (Linux and macOS)."""

HEADER = struct.Struct("<IBQ")
SIZE = struct.Struct("<I")
SECONDS = struct.Struct("<d")
SIGNED = struct.Struct("<q")

CONFIG, TASK, REVOKE, LEVELS = 1, 2, 3, 4
HELLO, STARTED, RESULT, ERROR, SKIPPED, LOG = 10, 11, 12, 13, 14, 15
FORKED, EXITED = 20, 21

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Bytes to write: a frame, or a part of one."""
Payload: TypeAlias = bytes | bytearray
"""A frame's payload as read: bytes, or the bytearray a large frame was read into."""
Frame: TypeAlias = tuple[int, int, Payload]
"""A frame as read: (kind, token, payload)."""

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_HEADER_SIZE = HEADER.size
_pack_size = SIZE.pack
_SIZE_SIZE = SIZE.size
_pack_seconds = SECONDS.pack
_SECONDS_SIZE = SECONDS.size


def frame(kind: int, token: int, payload: bytes = b"") -> bytes:
    """One frame, ready to write."""
    return _pack(len(payload), kind, token) + payload


def task_frame(token: int, function: bytes, arguments: bytes) -> list[bytes]:
    """A TASK frame as the buffers to write: one, or if it is large, the pickles apart (not copied)."""
    length = _SIZE_SIZE + len(function) + len(arguments)
    header = _pack(length, TASK, token)
    size = _pack_size(len(function))
    if length < LARGE:
        return [b"".join((header, size, function, arguments))]
    return [header + size, function, arguments]


def outcome_frame(kind: int, token: int, seconds: float, body: bytes) -> list[bytes]:
    """A RESULT or ERROR frame as the buffers to write: one, or if it is large, the pickle apart."""
    length = _SECONDS_SIZE + len(body)
    header = _pack(length, kind, token)
    if length < LARGE:
        return [b"".join((header, _pack_seconds(seconds), body))]
    return [header + _pack_seconds(seconds), body]


class FrameReader:
    """Cuts the bytes read from a pipe into frames; keeps a partial frame for later.

    Small frames are gathered in one buffer and copied out of it. A frame of ``LARGE`` bytes or
    more gets a bytearray of its own as soon as its header is in: :meth:`read` reads its bytes
    straight into it, and it becomes the frame's payload.
    """

    __slots__ = ("_buffer", "_filled", "_kind", "_large", "_token")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._large: bytearray | None = None
        """The payload of the large frame being read, of which ``_filled`` bytes have come."""
        self._filled = 0
        self._kind = 0
        self._token = 0

    def read(self, fd: int, frames: MutableSequence[Frame]) -> int:
        """Read from ``fd`` once, add the frames now complete to ``frames``; return the bytes read.

        0 means the pipe has ended; errors are those of :func:`os.read` (BlockingIOError when a
        non-blocking pipe is empty).
        """
        large = self._large
        if large is None:
            data = os.read(fd, READ_SIZE)
            if data:
                self._cut(data, frames)
            return len(data)
        count = os.readv(fd, (memoryview(large)[self._filled :],))
        self._filled += count
        if self._filled == len(large):
            self._large = None
            frames.append((self._kind, self._token, large))
        return count

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return the (kind, token, payload) of every frame now complete."""
        frames: list[Frame] = []
        self._cut(data, frames)
        return frames

    def _cut(self, data: bytes, frames: MutableSequence[Frame]) -> None:
        large = self._large
        if large is not None:  # fed, not read: copy into it what belongs to it
            taken = min(len(data), len(large) - self._filled)
            large[self._filled : self._filled + taken] = memoryview(data)[:taken]
            self._filled += taken
            if self._filled < len(large):
                return
            self._large = None
            frames.append((self._kind, self._token, large))
            data = data[taken:]
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        position = 0
        with memoryview(buffer) as view:
            while end - position >= _HEADER_SIZE:
                length, kind, token = _unpack_from(view, position)
                start = position + _HEADER_SIZE
                stop = start + length
                if stop > end:
                    if length >= LARGE:
                        large = bytearray(length)
                        large[: end - start] = view[start:end]
                        self._large, self._filled = large, end - start
                        self._kind, self._token = kind, token
                        position = end
                    break
                frames.append((kind, token, bytes(view[start:stop])))
                position = stop
        if position:
            del buffer[:position]


def drop_written(buffers: deque[Buffer], count: int) -> None:
    """Remove the first ``count`` bytes of ``buffers`` (they were written), copying nothing."""
    while buffers and count >= len(buffers[0]):
        count -= len(buffers.popleft())
    if count:
        buffers[0] = memoryview(buffers[0])[count:]


def write_once(fd: int, buffers: Sequence[Buffer], size: int) -> int:
    """Write ``buffers`` (``size`` bytes in all) with one system call; return the bytes written.

    Small buffers are joined first, as one buffer is cheaper to write than several; large ones are
    written from where they are. Errors are those of :func:`os.write`.
    """
    if size < LARGE:
        return os.write(fd, b"".join(buffers))
    return os.writev(fd, buffers[:IOV_MAX])


def write_some(fd: int, buffers: deque[Buffer]) -> None:
    """Write from the front of ``buffers`` once, and remove what was written.

    Errors are those of :func:`os.writev` (BlockingIOError when a non-blocking pipe is full).
    """
    drop_written(buffers, os.writev(fd, list(islice(buffers, IOV_MAX))))


def write_all(fd: int, buffers: Sequence[Buffer]) -> None:
    """Write ``buffers``, in order, to a blocking file descriptor (one system call, as a rule)."""
    size = sum(map(len, buffers))
    written = write_once(fd, buffers, size)
    if written < size:
        rest = deque(buffers)
        drop_written(rest, written)
        while rest:
            write_some(fd, rest)
