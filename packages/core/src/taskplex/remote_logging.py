"""Log records across a process boundary: packed where a task logs, re-emitted where the caller is.

The worker side turns each :class:`logging.LogRecord` into bytes with :func:`pack_record`. The record
keeps its arguments when they pickle, so handlers and filters of the caller see it as it was made;
otherwise its message is formatted where it was logged and travels as text, as does a traceback
(traceback objects never pickle). The caller side hands the bytes to :func:`emit_record`, which
re-emits the record through ``logging.getLogger(record.name)`` if that logger is enabled for its
level, so the caller's own configuration decides where it goes.

:func:`logger_levels` and :func:`apply_logger_levels` copy the levels configured in the caller to
the worker, so that records the caller would drop are not even sent.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

__all__ = ["apply_logger_levels", "emit_record", "logger_levels", "pack_record", "unpack_record"]

_formatter = logging.Formatter()


def pack_record(record: logging.LogRecord) -> bytes:
    """A picklable copy of ``record``, degraded to text where its parts do not pickle."""
    state = dict(record.__dict__)
    if state.get("exc_info"):
        if not state.get("exc_text"):
            state["exc_text"] = _formatter.formatException(state["exc_info"])
        state["exc_info"] = None
    try:
        return pickle.dumps(state, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    state["msg"] = _message_of(record)
    state["args"] = None
    for key, value in state.items():
        try:
            pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            state[key] = _safe_repr(value)
    return pickle.dumps(state, pickle.HIGHEST_PROTOCOL)


def unpack_record(data: bytes) -> logging.LogRecord:
    """Rebuild a record packed by :func:`pack_record`."""
    return logging.makeLogRecord(pickle.loads(data))


def emit_record(record: logging.LogRecord) -> None:
    """Re-emit ``record`` in this process, through its logger, if the logger wants its level."""
    target = logging.getLogger(record.name)
    if target.isEnabledFor(record.levelno):
        target.handle(record)


def logger_levels() -> dict[str, int]:
    """The levels set in this process: the root's (key ``""``) and any logger's set explicitly."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def apply_logger_levels(levels: dict[str, int]) -> None:
    """Set the levels recorded by :func:`logger_levels` in this process."""
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


def _message_of(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a format string that does not match its arguments
        return f"{record.msg!s} {_safe_repr(record.args)}"


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"
