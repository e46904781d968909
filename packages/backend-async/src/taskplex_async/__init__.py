"""The asyncio backend of taskplex: ``taskplex.Executor("async", workers=4)``."""

from taskplex_async.server import AsyncServer

__all__ = ["AsyncServer"]
