"""The wire format between clients, the broker and worker hosts: multipart ZeroMQ messages.

Every message's first frame is one byte naming its kind; ids travel packed in one frame as
unsigned 64-bit integers (native byte order: every peer of a broker checks it in HELLO), so a
batch of a thousand tasks is a handful of frames and one system call. Control data that is not an
id or an opaque payload (names, logger levels) is JSON. The broker never unpickles anything: it
routes payload frames it does not look into, so a hostile frame can at worst be dropped.

Payloads of a batch travel as two frames (:func:`pack_parts`): their lengths, and their bytes.

Client -> broker: HELLO (version, order mark, session limit, levels JSON), SUBMIT (ids, then the
parts function, arguments of each task), GO (ids that may start, ids that may not), ABORT (ids),
LEVELS (JSON), PING, BYE.
Worker -> broker: HELLO (version, order mark, capacity, name), READY (keys it still waits for),
STARTED (keys, pids), RESULTS (keys, one flag byte per key, the payload parts, then optionally
STARTED's two frames), LOGS (keys, one record frame per key), PING.
Broker -> client: WELCOME (incarnation), READY (ids), STARTED (groups of ids, worker
name, pids), RESULTS (ids, flags, payload parts, then STARTED's groups if any), LOGS (records),
PING (incarnation), UNKNOWN (say HELLO again). A finished task and the start of the next one so
travel as one message.
Broker -> worker: WELCOME (incarnation, levels JSON), TASKS (keys, function and arguments parts),
GO (keys), CANCEL (keys), LEVELS (JSON), PING (incarnation), UNKNOWN.

A worker host starts a task only after its client said GO, having committed to it there
(``Attempt.claim``): a cancel that withdrew the task first is never beaten by its start. The
broker asks the client (READY) as it hands the task out; the worker host asks again about a task
it still holds a heartbeat later, in case the question or the answer was lost.
"""

from __future__ import annotations

import array
import json
import sys
from typing import Any, cast

import zmq

PROTOCOL_VERSION = b"\x02"
ORDER_MARK = (1).to_bytes(8, sys.byteorder)
"""Sent in HELLO: a peer with the other byte order would misread every packed id."""

# ------------------------------------------------------------------ client -> broker
C_HELLO = b"H"
C_SUBMIT = b"S"
C_ABORT = b"A"
C_LEVELS = b"L"
C_PING = b"P"
C_BYE = b"B"
C_GO = b"G"
CLIENT_KINDS = frozenset((C_HELLO, C_SUBMIT, C_ABORT, C_LEVELS, C_PING, C_BYE, C_GO))

# ------------------------------------------------------------------ worker -> broker
W_HELLO = b"h"
W_STARTED = b"s"
W_RESULTS = b"r"
W_LOGS = b"l"
W_PING = b"p"
W_READY = b"y"
WORKER_KINDS = frozenset((W_HELLO, W_STARTED, W_RESULTS, W_LOGS, W_PING, W_READY))

# ------------------------------------------------------------------ broker -> peers
WELCOME = b"W"
STARTED = b"s"
RESULTS = b"r"
LOGS = b"l"
TASKS = b"T"
READY = b"y"
GO = b"G"
CANCEL = b"C"
LEVELS = b"L"
PING = b"P"
UNKNOWN = b"?"

# ------------------------------------------------------------------ result flags
OK = 0
"""The payload is the pickled result."""
ERROR = 1
"""The payload is the pickled exception (``taskplex.serialization.dumps_exception``)."""
UNSTARTED = 2
"""The task never started (withdrawn); the payload is empty. It may run again."""
LOST = 3
"""The worker host died or vanished while the task ran; the payload is the reason, UTF-8."""
FLAGS = frozenset((OK, ERROR, UNSTARTED, LOST))

RESULTS_FRAMES = 5
"""Frames of a RESULTS message (kind, ids, flags, two payload frames) before any starts it carries."""

MAX_BATCH = 1 << 16
"""Most tasks, results or records in one message; larger batches are malformed."""


class Malformed(Exception):
    """A message that does not follow this protocol; the receiver counts and drops it."""


# plain ints: pyzmq's flag enums cost more to combine than a short message costs to send
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send(socket: zmq.Socket[Any], frames: list[bytes], *, block: bool = True) -> None:
    """Send ``frames`` as one message (``Socket.send_multipart``, leaner); zmq.Again if it would
    block and not ``block``."""
    last = len(frames) - 1
    flags = 0 if block else _NOBLOCK
    more = flags | _MORE
    put = socket.send
    for index in range(last):
        put(frames[index], more)
    put(frames[last], flags)


def receive(socket: zmq.Socket[Any]) -> list[bytes] | None:
    """The next whole message waiting in ``socket``, or None if none is (without raising)."""
    if not cast(int, socket.getsockopt(_EVENTS)) & _POLLIN:
        return None
    get = socket.recv
    frames = [get(_NOBLOCK)]
    while socket.getsockopt(_RCVMORE):
        frames.append(get(_NOBLOCK))
    return frames


def readable(socket: zmq.Socket[Any]) -> bool:
    """Whether a message waits in ``socket`` (whose fd signals only edges)."""
    return bool(cast(int, socket.getsockopt(_EVENTS)) & _POLLIN)


def pack_ids(ids: list[int]) -> bytes:
    return array.array("Q", ids).tobytes()


def unpack_ids(frame: bytes | memoryview) -> list[int]:
    """The ids packed in ``frame``; Malformed if it is not a whole number of them."""
    if len(frame) % 8 or len(frame) > 8 * MAX_BATCH:
        raise Malformed(f"an id frame of {len(frame)} bytes")
    ids = array.array("Q")
    ids.frombytes(frame)
    return ids.tolist()


_U32 = 4


def pack_parts(parts: list[bytes]) -> list[bytes]:
    """Byte strings as two frames: their lengths (packed ids) and their concatenation.

    A batch costs two frames whatever its size: ZeroMQ's cost is per frame."""
    return [pack_ids([len(part) for part in parts]), b"".join(parts)]


def unpack_parts(lengths: bytes, blob: bytes, count: int) -> list[bytes]:
    """The ``count`` byte strings of :func:`pack_parts`; Malformed if the frames disagree."""
    sizes = unpack_ids(lengths)
    if len(sizes) != count or sum(sizes) != len(blob):
        raise Malformed(f"{len(sizes)} parts of {sum(sizes)} bytes for {count} parts of {len(blob)}")
    parts = []
    start = 0
    for size in sizes:
        stop = start + size
        parts.append(blob[start:stop])  # one copy, no intermediate view: the cost is per part
        start = stop
    return parts


def pack_u32(value: int) -> bytes:
    return value.to_bytes(_U32, "little")


def unpack_u32(frame: bytes) -> int:
    if len(frame) != _U32:
        raise Malformed(f"a 4-byte count frame of {len(frame)} bytes")
    return int.from_bytes(frame, "little")


def pack_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def unpack_levels(frame: bytes) -> dict[str, int]:
    """Logger levels as sent by a client: a JSON object of names to integer levels."""
    try:
        value = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"levels that are not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and type(level) is int for name, level in value.items()
    ):
        raise Malformed("levels that are not an object of names to integers")
    return value


def expect(frames: list[bytes], length: int, what: str) -> None:
    """A message of a fixed number of frames."""
    if len(frames) != length:
        raise Malformed(f"{what} of {len(frames)} frames, expected {length}")


def check_hello(frames: list[bytes], length: int) -> None:
    """A HELLO has ``length`` frames, this protocol's version and this machine's byte order."""
    if len(frames) != length:
        raise Malformed(f"a HELLO of {len(frames)} frames, expected {length}")
    if frames[1] != PROTOCOL_VERSION:
        raise Malformed(f"protocol version {frames[1]!r}, this broker speaks {PROTOCOL_VERSION!r}")
    if frames[2] != ORDER_MARK:
        raise Malformed("a peer with another byte order")
