"""What a worker host reports about its tasks, and in which order, seen from the client."""

from __future__ import annotations

import uuid

import pytest
import zmq_tasks
from conftest import BOUND

import taskplex


def test_a_tasks_log_records_arrive_before_its_result(caplog: pytest.LogCaptureFixture) -> None:
    # The worker host gathers what a turn of its loop produced and sends the log records ahead
    # of the results, so a caller that has a result also has every record its task made.
    name = f"taskplex.tests.zmq_order.{uuid.uuid4().hex}"

    def arrived(value: int) -> bool:
        return any(r.name == name and r.getMessage() == f"record {value}" for r in caplog.records)

    with taskplex.Executor("zmq", workers=2) as executor:
        for value in range(50):
            assert executor.submit(zmq_tasks.log_and_return, name, value).result(timeout=BOUND) == value
            assert arrived(value), f"the record of task {value} came after its result"
        futures = [executor.submit(zmq_tasks.log_and_return, name, v) for v in range(50, 550)]
        for value, future in zip(range(50, 550), futures, strict=True):
            assert future.result(timeout=BOUND) == value
            assert arrived(value), f"the record of task {value} came after its result"
