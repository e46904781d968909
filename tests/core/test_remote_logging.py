"""taskplex.remote_logging: records survive pickling, degrade to text, and obey the caller's levels."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from taskplex.remote_logging import (
    LevelWatch,
    apply_logger_levels,
    emit_record,
    logger_levels,
    pack_record,
    unpack_record,
)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("tests.remote_logging")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def record(msg: str, *args: object, level: int = logging.INFO, exc: bool = False) -> logging.LogRecord:
    return logging.getLogger("tests.remote_logging").makeRecord(
        "tests.remote_logging", level, __file__, 1, msg, args, sys.exc_info() if exc else None
    )


def test_picklable_records_keep_their_arguments(collected: Collect) -> None:
    emit_record(unpack_record(pack_record(record("answer %s", 42))))
    [got] = collected.records
    assert got.args == (42,)
    assert got.getMessage() == "answer 42"


def test_unpicklable_arguments_degrade_to_the_formatted_message(collected: Collect) -> None:
    emit_record(unpack_record(pack_record(record("holding %s", threading.Lock()))))
    [got] = collected.records
    assert "_thread.lock object" in got.getMessage()
    assert not got.args


def test_tracebacks_travel_as_text(collected: Collect) -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        packed = pack_record(record("failed", level=logging.ERROR, exc=True))
    emit_record(unpack_record(packed))
    [got] = collected.records
    assert got.exc_info is None
    assert got.exc_text is not None
    assert "ValueError: bad value" in got.exc_text


def test_records_below_the_callers_level_are_dropped(collected: Collect) -> None:
    emit_record(unpack_record(pack_record(record("too chatty", level=logging.DEBUG))))
    assert collected.records == []


def test_levels_are_copied() -> None:
    logger = logging.getLogger("tests.remote_logging.levels")
    logger.setLevel(logging.WARNING)
    try:
        levels = logger_levels()
        assert levels["tests.remote_logging.levels"] == logging.WARNING
        assert "" in levels
        logger.setLevel(logging.NOTSET)
        apply_logger_levels(levels)
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(logging.NOTSET)


def test_level_watch_notices_a_change_and_only_a_change() -> None:
    logger = logging.getLogger("tests.remote_logging.watch")
    watch = LevelWatch()
    try:
        assert watch.changed() is None
        logger.setLevel(logging.DEBUG)
        changed = watch.changed()
        assert changed is not None
        assert changed["tests.remote_logging.watch"] == logging.DEBUG
        assert watch.changed() is None, "the same levels were reported twice"
        logger.setLevel(logging.DEBUG)  # clears the caches, but changes nothing
        assert watch.changed() is None
        logging.disable(logging.CRITICAL)
        logging.disable(logging.NOTSET)
        assert watch.changed() is None
        logger.setLevel(logging.NOTSET)
        changed = watch.changed()
        assert changed is not None
        assert "tests.remote_logging.watch" not in changed
    finally:
        logger.setLevel(logging.NOTSET)


def test_unset_levels_are_unset_where_applied() -> None:
    logger = logging.getLogger("tests.remote_logging.unset")
    try:
        apply_logger_levels({"tests.remote_logging.unset": logging.ERROR})
        assert logger.level == logging.ERROR
        apply_logger_levels({}, previous={"tests.remote_logging.unset": logging.ERROR})
        assert logger.level == logging.NOTSET
    finally:
        logger.setLevel(logging.NOTSET)
