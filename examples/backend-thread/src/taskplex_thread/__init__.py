"""An example third-party taskplex backend: ``taskplex.Executor("thread", workers=4)``."""

from taskplex_thread.server import ThreadBackend, ThreadServer

__all__ = ["ThreadBackend", "ThreadServer"]
