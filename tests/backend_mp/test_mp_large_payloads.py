"""A large argument or result costs the caller's process at most one copy of it beyond its own.

Measured with tracemalloc in the caller's process (the server runs there, in its own thread): the
peak traced memory, over what was traced before, while a 200 MiB argument goes to a worker and
while a 200 MiB result comes back. Going out, the argument is the caller's object and its pickle,
which the frames are written from; coming back, the result is read into one buffer of its size,
which it is unpickled from. The frames themselves, large and small, arrive as they were sent.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import tracemalloc
from collections.abc import Iterator

import mp_tasks
import pytest

import taskplex
from taskplex_mp._frames import (
    IOV_MAX,
    LARGE,
    RESULT,
    REVOKE,
    SKIPPED,
    STARTED,
    Frame,
    FrameReader,
    frame,
    outcome_frame,
    task_frame,
    write_all,
)
from taskplex_mp._worker_handle import WorkerHandle

BOUND = 60.0
SIZE = 200 << 20
SLACK = 0.3
"""Of SIZE: room for everything else the process allocates meanwhile."""


@pytest.fixture(scope="module")
def executor() -> Iterator[taskplex.Executor]:
    with taskplex.Executor("mp", workers=1) as executor:
        executor.submit(mp_tasks.pid).result(timeout=BOUND)  # its worker is up
        yield executor


@pytest.fixture
def traced() -> Iterator[int]:
    """Trace allocations for one test; yield the bytes traced at its start."""
    gc.collect()
    tracemalloc.start()
    try:
        yield tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def copies(traced_bytes: int, baseline: int) -> float:
    return (traced_bytes - baseline) / SIZE


def test_a_large_argument_is_written_from_its_pickle(executor: taskplex.Executor, traced: int) -> None:
    argument = b"x" * SIZE
    future = executor.submit(mp_tasks.echo_len, argument)
    # submit pickled it: that copy is the one allowed. pickle.dumps itself peaks higher (its output
    # buffer grows to 1.5 times one large write), which is the serializer's affair; from here on
    # the argument is only sent.
    tracemalloc.reset_peak()
    assert future.result(timeout=BOUND) == SIZE
    peak = copies(tracemalloc.get_traced_memory()[1], traced)
    assert peak < 2 + SLACK, f"sending the argument took {peak:.2f} times its size"


def test_a_large_result_is_unpickled_from_the_buffer_it_was_read_into(
    executor: taskplex.Executor, traced: int
) -> None:
    mp_tasks.MEMORY_AT_LOAD.clear()
    probe, result = executor.submit(mp_tasks.make_probed, SIZE).result(timeout=BOUND)
    _, peak = tracemalloc.get_traced_memory()
    assert probe is None
    assert len(result) == SIZE
    [(_, peak_when_read)] = mp_tasks.MEMORY_AT_LOAD
    read = copies(peak_when_read, traced)
    assert read < 1 + SLACK, f"reading the result took {read:.2f} times its size"
    loaded = copies(peak, traced)
    assert loaded < 2 + SLACK, f"reading and unpickling the result took {loaded:.2f} times its size"


# ====================================================================== the frames themselves

LARGE_BYTES = bytes(range(256)) * (3 * LARGE // 256) + b"end"
FRAMES: list[Frame] = [
    (STARTED, 1, b""),
    (RESULT, 1, b"\0" * 8 + LARGE_BYTES),
    (SKIPPED, 2, b""),
    (2, 3, (4).to_bytes(4, "little") + b"func" + LARGE_BYTES),
    (REVOKE, 4, b""),
]
BUFFERS = [
    frame(STARTED, 1),
    *outcome_frame(RESULT, 1, 0.0, LARGE_BYTES),
    frame(SKIPPED, 2),
    *task_frame(3, b"func", LARGE_BYTES),
    frame(REVOKE, 4),
]


def received(frames: list[Frame]) -> list[Frame]:
    return [(kind, token, bytes(payload)) for kind, token, payload in frames]


def write_and_close(fd: int, buffers: list[bytes]) -> None:
    try:
        write_all(fd, buffers)
    finally:
        os.close(fd)


def test_frames_large_and_small_are_read_as_written() -> None:
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=write_and_close, args=(write_end, BUFFERS))
    writer.start()
    reader = FrameReader()
    frames: list[Frame] = []
    try:
        while reader.read(read_end, frames):
            pass
    finally:
        writer.join(BOUND)
        os.close(read_end)
    assert received(frames) == FRAMES


@pytest.mark.parametrize("chunk", [1000, LARGE, 10 * LARGE])
def test_frames_large_and_small_are_cut_from_any_chunks(chunk: int) -> None:
    data = b"".join(BUFFERS)
    reader = FrameReader()
    frames = [
        each for start in range(0, len(data), chunk) for each in reader.feed(data[start : start + chunk])
    ]
    assert received(frames) == FRAMES


def test_write_all_writes_more_buffers_than_one_system_call_takes() -> None:
    buffers = [bytes([index % 256]) * 100 for index in range(IOV_MAX + 10)]
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=write_and_close, args=(write_end, buffers))
    writer.start()
    data = bytearray()
    try:
        while chunk := os.read(read_end, LARGE):
            data += chunk
    finally:
        writer.join(BOUND)
        os.close(read_end)
    assert data == b"".join(buffers)


def test_what_the_task_pipe_will_not_take_yet_goes_later_in_order() -> None:
    loop = asyncio.new_event_loop()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    handle = WorkerHandle(loop, write_end, -1, None)
    # more bytes than a pipe holds, in more buffers than one system call takes, and one behind them
    sent = [*task_frame(3, b"func", LARGE_BYTES), *(frame(REVOKE, token) for token in range(IOV_MAX))]
    handle.send(*sent)
    assert handle.outbox
    handle.send(frame(SKIPPED, 3))
    expected = b"".join([*sent, frame(SKIPPED, 3)])
    got = bytearray()

    def read_all() -> None:
        while len(got) < len(expected) and (chunk := os.read(read_end, LARGE)):
            got.extend(chunk)

    async def flushed() -> None:
        while handle.outbox:
            await asyncio.sleep(0.001)

    reading = threading.Thread(target=read_all)
    reading.start()
    try:
        loop.run_until_complete(asyncio.wait_for(flushed(), BOUND))
    finally:
        handle.close_pipes()
        reading.join(BOUND)
        os.close(read_end)
        loop.close()
    assert got == expected
