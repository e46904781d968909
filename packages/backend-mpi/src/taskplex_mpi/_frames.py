"""Frames between the server and its spawn host: a 4-byte length, then a pickle.

Server to host: the spawn's settings (a dict: count, python, mpiexec), then batches of orders,
each a list of ``(rank, orders)``. Host to server: ``(READY, mpi, mpiexec)`` or
``(UNAVAILABLE, reason)`` or ``(FAILED, error)`` once, then ``(EVENTS, [(rank, events), ...])``.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

__all__ = ["EVENTS", "FAILED", "READY", "UNAVAILABLE", "FrameReader", "frame"]

HEADER = struct.Struct("<I")
READY, UNAVAILABLE, FAILED, EVENTS = "ready", "unavailable", "failed", "events"


def frame(message: Any) -> bytes:
    """``message`` pickled, with its length in front."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class FrameReader:
    """Collects bytes as they arrive and returns the messages now complete."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        messages = []
        position = 0
        while len(buffer) - position >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, position)
            start = position + HEADER.size
            if len(buffer) - start < length:
                break
            messages.append(pickle.loads(buffer[start : start + length]))
            position = start + length
        del buffer[:position]
        return messages
