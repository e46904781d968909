"""What a chunked ``Executor.map`` runs in a worker: kept apart, so a worker imports only this.

A worker unpickles these functions by reference; importing them from :mod:`taskplex.executor`
would make every worker import the scheduler, asyncio and the plugins on its first chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["await_chunk", "call_chunk"]

T = TypeVar("T")


def call_chunk(fn: Callable[..., T], calls: tuple[tuple[Any, ...], ...]) -> list[T]:
    """Run one chunk of a chunked map inside a single task."""
    return [fn(*args) for args in calls]


async def await_chunk(fn: Callable[..., Any], calls: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """Run one chunk of a chunked map of a coroutine function inside a single task."""
    return [await fn(*args) for args in calls]
