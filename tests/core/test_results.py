"""ResultsQueue: order, batches, readers in threads and in asyncio, and close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskplex import QueueClosed, ResultsQueue, Task

BOUND = 30.0
"""Seconds a test waits for something that should happen, so that it fails instead of hanging."""


def finished(label: str) -> Task:
    return Task(print, (label,), name=label)


def names(tasks: list[Task]) -> list[str | None]:
    return [task.name for task in tasks]


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


async def async_wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def blocked_sync_readers(queue: ResultsQueue) -> int:
    # Private, read only to make sure a put happens while the reader is really blocked.
    return queue._sync_waiters


def blocked_async_readers(queue: ResultsQueue) -> int:
    return len(queue._async_waiters)


class Reader(threading.Thread):
    """A thread that runs one blocking read and keeps what it returned or raised."""

    def __init__(self, read: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.read()
        except BaseException as exc:
            self.error = exc

    def result(self) -> Any:
        self.join(BOUND)
        assert not self.is_alive(), "reader still blocked"
        if self.error is not None:
            raise self.error
        return self.value


def test_tasks_come_out_in_the_order_they_were_put() -> None:
    queue = ResultsQueue()
    for label in "abc":
        queue.put(finished(label))
    assert len(queue) == 3
    assert [queue.get_sync(timeout=BOUND).name for _ in range(3)] == ["a", "b", "c"]
    assert len(queue) == 0


def test_get_nowait_on_an_empty_queue() -> None:
    queue = ResultsQueue()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.put(finished("a"))
    assert queue.get_nowait().name == "a"


def test_batch_takes_at_least_min_and_at_most_max() -> None:
    queue = ResultsQueue()
    for label in "abcde":
        queue.put(finished(label))
    assert names(queue.get_batch_sync(2, 3, timeout=BOUND)) == ["a", "b", "c"]
    assert names(queue.get_batch_sync(1, 5, timeout=BOUND)) == ["d", "e"]


def test_batch_without_max_takes_everything_ready() -> None:
    queue = ResultsQueue()
    for label in "abcd":
        queue.put(finished(label))
    assert names(queue.get_batch_sync(2, timeout=BOUND)) == ["a", "b", "c", "d"]


def test_batch_waits_for_min_items() -> None:
    queue = ResultsQueue()
    queue.put(finished("a"))
    reader = Reader(lambda: queue.get_batch_sync(3, timeout=BOUND))
    reader.start()
    for label in "bc":
        wait_until(lambda: blocked_sync_readers(queue) == 1)
        assert reader.is_alive()
        queue.put(finished(label))
    assert names(reader.result()) == ["a", "b", "c"]


def test_async_batch_takes_at_least_min_and_at_most_max() -> None:
    queue = ResultsQueue()

    async def main() -> list[list[str | None]]:
        first = asyncio.ensure_future(queue.get_batch(2, 2))
        await async_wait_until(lambda: blocked_async_readers(queue) == 1)
        queue.put(finished("a"))
        await asyncio.sleep(0)
        queue.put(finished("b"))
        queue.put(finished("c"))
        taken = [names(await asyncio.wait_for(first, BOUND))]
        taken.append(names(await asyncio.wait_for(queue.get_batch(1), BOUND)))
        return taken

    assert asyncio.run(main()) == [["a", "b"], ["c"]]


@pytest.mark.parametrize(("min_items", "max_items"), [(0, None), (-1, 3), (3, 2)])
def test_bad_batch_bounds_are_rejected(min_items: int, max_items: int | None) -> None:
    queue = ResultsQueue()
    queue.put(finished("a"))
    with pytest.raises(ValueError, match="min_items"):
        queue.get_batch_sync(min_items, max_items, timeout=BOUND)
    with pytest.raises(ValueError, match="min_items"):
        asyncio.run(queue.get_batch(min_items, max_items))
    assert len(queue) == 1


def test_get_sync_times_out() -> None:
    queue = ResultsQueue()
    with pytest.raises(TimeoutError, match="fewer than 1 result"):
        queue.get_sync(timeout=0.05)
    queue.put(finished("a"))
    with pytest.raises(TimeoutError, match="fewer than 2 result"):
        queue.get_batch_sync(2, timeout=0.05)
    assert len(queue) == 1, "a batch that timed out takes nothing"


def test_reader_thread_is_woken_by_a_put_from_another_thread() -> None:
    queue = ResultsQueue()
    reader = Reader(lambda: queue.get_sync(timeout=BOUND))
    reader.start()
    wait_until(lambda: blocked_sync_readers(queue) == 1)
    writer = threading.Thread(target=queue.put, args=(finished("a"),))
    writer.start()
    writer.join(BOUND)
    assert reader.result().name == "a"


def test_async_reader_is_woken_by_a_put_from_another_thread() -> None:
    queue = ResultsQueue()

    async def main() -> Task:
        reading = asyncio.ensure_future(queue.get())
        await async_wait_until(lambda: blocked_async_readers(queue) == 1)
        writer = threading.Thread(target=queue.put, args=(finished("a"),))
        writer.start()
        task = await asyncio.wait_for(reading, BOUND)
        writer.join(BOUND)
        return task

    assert asyncio.run(main()).name == "a"


def test_async_readers_in_two_loops_each_get_a_different_task() -> None:
    queue = ResultsQueue()
    readers = [Reader(lambda: asyncio.run(asyncio.wait_for(queue.get(), BOUND))) for _ in "ab"]
    for reader in readers:
        reader.start()
    wait_until(lambda: blocked_async_readers(queue) == 2)
    queue.put(finished("a"))
    queue.put(finished("b"))
    assert sorted(reader.result().name for reader in readers) == ["a", "b"]


def test_every_task_is_taken_exactly_once_by_concurrent_readers() -> None:
    queue = ResultsQueue()
    per_writer, writers_count = 200, 4
    taken: list[Task] = []
    taken_lock = threading.Lock()

    def read() -> None:
        for task in queue:
            with taken_lock:
                taken.append(task)

    def write(prefix: str) -> None:
        for i in range(per_writer):
            queue.put(finished(f"{prefix}{i}"))

    readers = [threading.Thread(target=read) for _ in range(3)]
    writers = [threading.Thread(target=write, args=(f"w{n}-",)) for n in range(writers_count)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join(BOUND)
    wait_until(lambda: len(taken) == per_writer * writers_count)
    queue.close()
    for thread in readers:
        thread.join(BOUND)
        assert not thread.is_alive()
    labels = [task.name for task in taken]
    assert len(set(labels)) == len(labels) == per_writer * writers_count


def test_close_wakes_waiting_readers_with_queue_closed() -> None:
    queue = ResultsQueue()
    sync_reader = Reader(lambda: queue.get_sync(timeout=BOUND))
    async_reader = Reader(lambda: asyncio.run(queue.get_batch(2)))
    sync_reader.start()
    async_reader.start()
    wait_until(lambda: blocked_sync_readers(queue) == 1 and blocked_async_readers(queue) == 1)
    queue.close()
    with pytest.raises(QueueClosed):
        sync_reader.result()
    with pytest.raises(QueueClosed):
        async_reader.result()


def test_reads_after_close_raise_queue_closed() -> None:
    queue = ResultsQueue()
    queue.put(finished("a"))
    queue.close()
    assert queue.closed
    with pytest.raises(QueueClosed, match="closed"):
        queue.get_sync(timeout=BOUND)
    with pytest.raises(QueueClosed):
        queue.get_nowait()
    with pytest.raises(QueueClosed):
        asyncio.run(queue.get())
    with pytest.raises(QueueClosed):
        queue.get_batch_sync(1, timeout=BOUND)


def test_puts_after_close_are_dropped_and_close_is_idempotent() -> None:
    queue = ResultsQueue()
    queue.close()
    queue.put(finished("late"))
    queue.close()
    assert len(queue) == 0
    assert queue.closed


def test_iteration_ends_when_the_queue_is_closed() -> None:
    queue = ResultsQueue()
    reader = Reader(lambda: names(list(queue)))
    reader.start()
    queue.put(finished("a"))
    queue.put(finished("b"))
    wait_until(lambda: len(queue) == 0 and blocked_sync_readers(queue) == 1)
    queue.close()
    assert reader.result() == ["a", "b"]


def test_async_iteration_ends_when_the_queue_is_closed() -> None:
    queue = ResultsQueue()

    async def collect() -> list[str | None]:
        return [task.name async for task in queue]

    async def main() -> list[str | None]:
        collecting = asyncio.ensure_future(collect())
        queue.put(finished("a"))
        queue.put(finished("b"))
        await async_wait_until(lambda: len(queue) == 0 and blocked_async_readers(queue) == 1)
        queue.close()
        return await asyncio.wait_for(collecting, BOUND)

    assert asyncio.run(main()) == ["a", "b"]


def test_cancelled_readers_leave_no_waiters_behind() -> None:
    queue = ResultsQueue()

    async def scenario() -> None:
        for _ in range(200):
            reader = asyncio.ensure_future(queue.get())
            await asyncio.sleep(0)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
        assert queue._async_waiters == [], "cancelled readers pile up"

    asyncio.run(scenario())
