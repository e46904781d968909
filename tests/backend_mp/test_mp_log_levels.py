"""Logger levels the caller changes while workers run reach them, under every start method."""

from __future__ import annotations

import logging
import uuid

import mp_tasks
import pytest

import taskplex
from taskplex_mp.processes import START_METHODS


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_level_lowered_after_start_reaches_every_worker(start_method: str) -> None:
    name = f"tests.mp.levels.{uuid.uuid4().hex}"
    logger = logging.getLogger(name)
    handler = _Messages()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with taskplex.Executor("mp", workers=2, start_method=start_method) as executor:
            # both workers up, and told WARNING
            list(executor.map(mp_tasks.log_debug, [name] * 4, timeout=60))
            assert handler.messages == []
            logger.setLevel(logging.DEBUG)
            list(executor.map(mp_tasks.log_debug, [name] * 4, timeout=60))
        assert handler.messages.count(f"debug from {name}") == 4
    finally:
        logger.setLevel(logging.NOTSET)
        logger.removeHandler(handler)
