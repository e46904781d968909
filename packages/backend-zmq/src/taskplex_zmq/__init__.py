"""The ZeroMQ backend of taskplex: ``taskplex.Executor("zmq", workers=4)``, or a detached broker.

The server classes are imported on first use: brokers and worker hosts need none of them.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskplex_zmq.server import ZmqBackend, ZmqServer

__all__ = ["ZmqBackend", "ZmqServer"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from taskplex_zmq import server

        return getattr(server, name)
    raise AttributeError(f"module 'taskplex_zmq' has no attribute {name!r}")
