"""The multiprocessing backend of taskplex: ``taskplex.Executor("mp", workers=4)``."""

from taskplex_mp.server import MultiprocessingBackend, MultiprocessingServer

__all__ = ["MultiprocessingBackend", "MultiprocessingServer"]
