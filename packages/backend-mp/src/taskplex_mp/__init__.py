"""The multiprocessing backend of taskplex: ``taskplex.Executor("mp", workers=4)``.

The server classes are imported on first use: worker processes import ``taskplex_mp.worker``
through this package and need none of the server side.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskplex_mp.server import MultiprocessingBackend, MultiprocessingServer

__all__ = ["MultiprocessingBackend", "MultiprocessingServer"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from taskplex_mp import server

        return getattr(server, name)
    raise AttributeError(f"module 'taskplex_mp' has no attribute {name!r}")
