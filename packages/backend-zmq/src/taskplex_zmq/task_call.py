"""What a worker host's task processes run: a call that arrived as bytes, answered as bytes.

The worker host hands :func:`run_call` the two pickled frames of a call exactly as the client
sent them; it runs in a task process of the host's mp backend, which supervises it. The worker host
itself never unpickles the user's function, arguments, result or exception: it forwards bytes.
"""

from __future__ import annotations

import logging
from typing import Any

from taskplex.serialization import dumps_exception, dumps_result, loads_call
from taskplex_zmq import _protocol as p

__all__ = ["KEY_ATTRIBUTE", "run_call"]

KEY_ATTRIBUTE = "taskplex_zmq_key"
"""Set on every log record made in a task process: the key of the task that ran, so that the
worker host sends the record to the client of that task."""


class _KeyedRecordFactory:
    """Wraps the process's log record factory: records carry the key of the running task."""

    def __init__(self) -> None:
        self.key: int | None = None
        self._base = logging.getLogRecordFactory()

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self._base(*args, **kwargs)
        setattr(record, KEY_ATTRIBUTE, self.key)
        return record


_factory: list[_KeyedRecordFactory] = []


def run_call(key: int, function: bytes, arguments: bytes) -> tuple[int, bytes]:
    """Run the pickled call; return (OK, pickled result) or (ERROR, pickled exception)."""
    if not _factory:
        _factory.append(_KeyedRecordFactory())
        logging.setLogRecordFactory(_factory[0])
    factory = _factory[0]
    factory.key = key
    try:
        call, args, kwargs = loads_call(function, arguments)
        return p.OK, dumps_result(call(*args, **kwargs))
    except BaseException as exc:  # the task's own failure, SystemExit included
        return p.ERROR, dumps_exception(exc)
    finally:
        factory.key = None
