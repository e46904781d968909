"""Where finished tasks are delivered: one queue readable from asyncio and from threads.

A server puts each finished task here exactly once, in completion order, without ever blocking its
event loop (the queue is unbounded). Readers take tasks one at a time (``get``), in batches of at least
N (``get_batch``), or by iterating; the ``*_sync`` variants block the calling thread instead of
awaiting. ``close()`` ends delivery: readers waiting at that moment, and any read afterwards, get
:class:`~taskplex.errors.QueueClosed`; tasks finishing later are dropped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from taskplex.backend import current_attempt
from taskplex.errors import QueueClosed

if TYPE_CHECKING:
    from taskplex.task import Task

__all__ = ["ResultsQueue"]


class ResultsQueue:
    """An unbounded, thread-safe queue of finished :class:`~taskplex.task.Task` objects."""

    def __init__(self) -> None:
        self._items: deque[Task] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._sync_waiters = 0
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def put(self, task: Task) -> None:
        """Deliver a finished task. Never blocks; dropped silently once the queue is closed."""
        with self._lock:
            if self._closed:
                return
            self._items.append(task)
            if self._sync_waiters:
                self._ready.notify()
            if self._async_waiters:
                self._wake_async()

    def close(self) -> None:
        """Stop delivery and wake every waiting reader with QueueClosed. Idempotent."""
        with self._lock:
            self._closed = True
            self._items.clear()
            self._ready.notify_all()
            self._wake_async()

    def _wake_async(self) -> None:
        waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(_resolve, fut)

    # ------------------------------------------------------------------ asyncio readers

    def get_nowait(self) -> Task:
        """Take one task; raise :class:`asyncio.QueueEmpty` if none is ready."""
        with self._lock:
            self._check_open()
            if not self._items:
                raise asyncio.QueueEmpty
            return self._items.popleft()

    async def get(self) -> Task:
        """Wait for and take the next finished task."""
        return (await self.get_batch(1, 1))[0]

    async def get_batch(self, min_items: int = 1, max_items: int | None = None) -> list[Task]:
        """Wait until at least ``min_items`` tasks are ready; take up to ``max_items`` (all if None)."""
        _check_batch(min_items, max_items)
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                self._check_open()
                if len(self._items) >= min_items:
                    return self._take(max_items)
                fut: asyncio.Future[None] = loop.create_future()
                waiter = (loop, fut)
                self._async_waiters.append(waiter)
            try:
                attempt = current_attempt.get()
                if attempt is None:
                    await fut
                else:
                    # a task waiting for other tasks lends its worker slots meanwhile
                    async with attempt._lending_slots_async():
                        await fut
            except BaseException:
                with self._lock:  # a cancelled reader leaves no waiter behind
                    if waiter in self._async_waiters:
                        self._async_waiters.remove(waiter)
                raise

    async def __aiter__(self) -> AsyncIterator[Task]:
        """Yield tasks as they finish, until the queue is closed."""
        while True:
            try:
                yield await self.get()
            except QueueClosed:
                return

    # ------------------------------------------------------------------ thread readers

    def get_sync(self, timeout: float | None = None) -> Task:
        """Block until the next task is ready; raise TimeoutError after ``timeout`` seconds."""
        return self.get_batch_sync(1, 1, timeout=timeout)[0]

    def get_batch_sync(
        self, min_items: int = 1, max_items: int | None = None, *, timeout: float | None = None
    ) -> list[Task]:
        """Block until at least ``min_items`` tasks are ready; take up to ``max_items``."""
        _check_batch(min_items, max_items)
        attempt = current_attempt.get()
        if attempt is not None:
            with self._lock:
                ready = self._closed or len(self._items) >= min_items
            if not ready:
                with attempt._lending_slots():
                    return self._wait_for_batch(min_items, max_items, timeout)
        return self._wait_for_batch(min_items, max_items, timeout)

    def _wait_for_batch(
        self, min_items: int, max_items: int | None, timeout: float | None
    ) -> list[Task]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                self._check_open()
                if len(self._items) >= min_items:
                    return self._take(max_items)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"fewer than {min_items} result(s) arrived within {timeout} s")
                self._sync_waiters += 1
                try:
                    self._ready.wait(remaining)
                finally:
                    self._sync_waiters -= 1

    def __iter__(self) -> Iterator[Task]:
        """Yield tasks as they finish, blocking, until the queue is closed."""
        while True:
            try:
                yield self.get_sync()
            except QueueClosed:
                return

    # ------------------------------------------------------------------ helpers (lock held)

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed("this results queue was closed; results are no longer available")

    def _take(self, max_items: int | None) -> list[Task]:
        items = self._items
        count = len(items) if max_items is None else min(max_items, len(items))
        return [items.popleft() for _ in range(count)]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _check_batch(min_items: int, max_items: int | None) -> None:
    if min_items < 1 or (max_items is not None and max_items < min_items):
        raise ValueError(
            f"need 1 <= min_items <= max_items, got min_items={min_items}, max_items={max_items}"
        )
