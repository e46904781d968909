"""Log records across a process boundary: packed where a task logs, re-emitted where the caller is.

The worker side turns each :class:`logging.LogRecord` into bytes with :func:`pack_record`. The record
keeps its arguments when they pickle, so handlers and filters of the caller see it as it was made;
otherwise its message is formatted where it was logged and travels as text, as does a traceback
(traceback objects never pickle). The caller side hands the bytes to :func:`emit_record`, which
re-emits the record through ``logging.getLogger(record.name)`` if that logger is enabled for its
level, so the caller's own configuration decides where it goes.

:func:`logger_levels` and :func:`apply_logger_levels` copy the levels configured in the caller to
the worker, so that records the caller would drop are not even sent. A :class:`LevelWatch` tells a
backend, at the cost of a dictionary look-up, when the caller has changed a level since, so that
the change reaches workers that are already running before the next task does.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

__all__ = [
    "LevelWatch",
    "apply_logger_levels",
    "emit_record",
    "logger_levels",
    "pack_record",
    "unpack_record",
]

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


def apply_logger_levels(levels: dict[str, int], previous: dict[str, int] | None = None) -> None:
    """Set the levels recorded by :func:`logger_levels` in this process.

    Loggers named in ``previous`` (the levels applied before) but not in ``levels`` had their level
    unset in the caller: they go back to ``NOTSET`` here too.
    """
    for name in (previous or {}).keys() - levels.keys():
        logging.getLogger(name or None).setLevel(logging.NOTSET)
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


class LevelWatch:
    """Notices when this process's logger levels change, cheaply enough to ask before every task.

    ``Logger.setLevel``, ``logging.disable`` and ``logging.config`` clear the level cache of every
    logger, a probe logger's included; while the probe's cache is still filled nothing can have
    changed, and :meth:`changed` returns at once. Only after a clearing does it compare the levels.
    (Levels set by assigning ``Logger.level`` directly bypass the cache and are not noticed.)
    """

    def __init__(self) -> None:
        self._probe = logging.getLogger(f"{__name__}.probe")
        self.levels = logger_levels()
        """The levels as of the last call."""
        self._arm()

    def _arm(self) -> None:
        self._probe.isEnabledFor(logging.DEBUG)  # fills the probe's cache

    def changed(self) -> dict[str, int] | None:
        """The new levels if they differ from :attr:`levels`, else None."""
        if getattr(self._probe, "_cache", None):
            return None
        levels = logger_levels()
        self._arm()
        if levels == self.levels:
            return None
        self.levels = levels
        return levels


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
