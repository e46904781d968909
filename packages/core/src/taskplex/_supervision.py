"""The background loops and blocking calls of a backend, kept for whoever drives it.

A :class:`~taskplex.scheduler.TaskServer` and a :class:`~taskplex.runner.Runner` both offer these
through :class:`~taskplex.backend.BackendContext`, with one difference: what they do when a loop
fails, which each says through the ``fail`` it is built with.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from taskplex.errors import BackendError

__all__ = ["BLOCKING_THREADS", "Supervision", "backend_failure"]

T = TypeVar("T")

BLOCKING_THREADS = 4
"""Threads per server for :meth:`BackendContext.run_blocking` calls."""


def backend_failure(logger: logging.Logger, what: str, error: BaseException, where: str) -> BackendError:
    """The BackendError that says ``what`` (a server, a runner) cannot go on because ``where``
    failed with ``error`` (its cause), logged to ``logger``."""
    failure = BackendError(f"{what}: {where} failed: {type(error).__name__}: {error}")
    failure.__cause__ = error
    logger.error("%s", failure, exc_info=error)
    return failure


class Supervision:
    """Runs a backend's loops, reporting one that raises to ``fail(error, where)``, and its
    blocking calls in threads of its own; :meth:`close` cancels the loops and lets the threads go."""

    def __init__(self, fail: Callable[[BaseException, str], None]) -> None:
        self._fail = fail
        self._loops: set[asyncio.Task[Any]] = set()
        self._blocking: ThreadPoolExecutor | None = None

    def spawn(
        self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any], name: str
    ) -> asyncio.Task[Any]:
        task = loop.create_task(self._supervise(coroutine, name), name=name)
        self._loops.add(task)
        task.add_done_callback(self._loops.discard)
        return task

    async def _supervise(self, coroutine: Coroutine[Any, Any, Any], name: str) -> Any:
        try:
            return await coroutine
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc, f"its background loop {name!r}")
            return None

    async def run_blocking(self, function: Callable[..., T], args: tuple[Any, ...], timeout: float) -> T:
        loop = asyncio.get_running_loop()
        if self._blocking is None:
            self._blocking = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="taskplex-blocking")
        running = loop.run_in_executor(self._blocking, functools.partial(function, *args))
        try:
            return await asyncio.wait_for(running, timeout)
        except TimeoutError:
            name = getattr(function, "__qualname__", repr(function))
            raise BackendError(f"{name} did not return within {timeout} s") from None

    async def close(self) -> None:
        loops, self._loops = self._loops, set()
        for task in loops:
            task.cancel()
        if loops:
            await asyncio.gather(*loops, return_exceptions=True)
        pool, self._blocking = self._blocking, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
