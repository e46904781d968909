"""What a worker host reports about its tasks, and in which order, seen from the client."""

from __future__ import annotations

import logging
import uuid

import zmq_tasks
from conftest import BOUND

import taskplex


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_tasks_log_records_arrive_before_its_result() -> None:
    # The worker host gathers what a turn of its loop produced and sends the log records ahead
    # of the results, so a caller that has a result also has every record its task made.
    name = f"taskplex.tests.zmq_order.{uuid.uuid4().hex}"
    handler = _Messages()
    task_logger = logging.getLogger(name)
    task_logger.addHandler(handler)
    try:
        with taskplex.Executor("zmq", workers=2) as executor:
            for value in range(50):
                future = executor.submit(zmq_tasks.log_and_return, name, value)
                assert future.result(timeout=BOUND) == value
                assert f"record {value}" in handler.messages, f"the record of task {value} was late"
            futures = [executor.submit(zmq_tasks.log_and_return, name, v) for v in range(50, 550)]
            for value, future in zip(range(50, 550), futures, strict=True):
                assert future.result(timeout=BOUND) == value
                assert f"record {value}" in handler.messages, f"the record of task {value} was late"
    finally:
        task_logger.removeHandler(handler)
