"""What the server and a worker process say to each other over their socket pair.

Server to worker: two pickles, then one byte. The first pickle is the configuration (the caller's
``sys.path`` and logger levels), the second the call (the pickles of the function and of its
arguments, as :func:`taskplex.serialization.dumps_call` made them). The byte ``GO`` follows once the
worker said READY and the attempt may start; if the connection ends instead, the worker exits
without running anything.

Worker to server: frames of a 5-byte header (payload length, kind) and a payload. LOG (a packed log
record) may come at any time; READY (the call is loaded, waiting for ``GO``) comes once; RESULT or
ERROR (the pickled result, or the pickled :class:`~taskplex.errors.ExceptionPayload`) ends it.
"""

from __future__ import annotations

import struct

__all__ = ["ERROR", "GO", "LOG", "READY", "RESULT", "FrameBuffer", "frame"]

HEADER = struct.Struct("<IB")
READY, RESULT, ERROR, LOG = 1, 2, 3, 4
GO = b"\x01"


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One frame, ready to send."""
    return HEADER.pack(len(payload), kind) + payload


class FrameBuffer:
    """Collects bytes as they arrive and cuts them into (kind, payload) frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add ``data``; return every frame now complete, keeping a partial one for later."""
        buffer = self._buffer
        buffer += data
        frames = []
        position = 0
        while len(buffer) - position >= HEADER.size:
            length, kind = HEADER.unpack_from(buffer, position)
            start = position + HEADER.size
            if len(buffer) - start < length:
                break
            frames.append((kind, bytes(buffer[start : start + length])))
            position = start + length
        del buffer[:position]
        return frames
