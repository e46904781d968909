"""The wire format between the server and its worker processes: length-prefixed frames on pipes.

Every frame is a 13-byte header (payload length, kind, token) and the payload. Several frames are
written with one system call and a reader takes all it can in one read, so small tasks cost a few
bytes, not a system call each.

Server to worker: CONFIG (once, first), TASK (token = the attempt's token; payload = the function's
pickle length, the function, the arguments), REVOKE (do not start this task). Closing the pipe tells
the worker to exit.

Worker to server: HELLO (ready; token = pid), STARTED (token now executes), RESULT and ERROR (token
ended; payload = seconds it ran, then the pickled result or exception), SKIPPED (a revoked token
was dropped unstarted), LOG (a pickled log record).

Fork server to server: FORKED (token = request id, payload = pid), EXITED (token = pid, payload =
exit code); server to fork server: a fork request carries the new worker's two pipe ends.
"""

from __future__ import annotations

import os
import struct

__all__ = ["FrameReader", "frame", "write_all"]

READ_SIZE = 1 << 16
"""Most bytes taken from a pipe in one read."""

HEADER = struct.Struct("<IBQ")
SIZE = struct.Struct("<I")
SECONDS = struct.Struct("<d")
SIGNED = struct.Struct("<q")

CONFIG, TASK, REVOKE = 1, 2, 3
HELLO, STARTED, RESULT, ERROR, SKIPPED, LOG = 10, 11, 12, 13, 14, 15
FORKED, EXITED = 20, 21

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_HEADER_SIZE = HEADER.size


def frame(kind: int, token: int, payload: bytes = b"") -> bytes:
    """One frame, ready to write."""
    return _pack(len(payload), kind, token) + payload


class FrameReader:
    """Collects bytes read from a pipe and cuts them into frames; keeps a partial frame for later."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Add ``data``; return the (kind, token, payload) of every frame now complete."""
        buffer = self._buffer
        buffer += data
        frames = []
        end = len(buffer)
        position = 0
        with memoryview(buffer) as view:
            while end - position >= _HEADER_SIZE:
                length, kind, token = _unpack_from(view, position)
                start = position + _HEADER_SIZE
                stop = start + length
                if stop > end:
                    break
                frames.append((kind, token, bytes(view[start:stop])))
                position = stop
        if position:
            del buffer[:position]
        return frames


def write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of ``data`` to a blocking file descriptor."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
