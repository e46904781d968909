"""The asyncio backend of taskplex: ``taskplex.Executor("async", workers=4)``."""

from taskplex_async.server import AsyncBackend, AsyncServer

__all__ = ["AsyncBackend", "AsyncServer"]
