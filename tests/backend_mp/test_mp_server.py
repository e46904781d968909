"""MultiprocessingServer's own behaviour: what crosses the process boundary, and its cores policy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mp_tasks
import pytest

import taskplex
from taskplex import ResourceUnavailable, SerializationError, Task, TaskplexError
from taskplex_mp import MultiprocessingServer

BOUND = 30.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {BOUND} s for {what}")
        time.sleep(0.01)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_backend_is_registered_with_its_capabilities() -> None:
    [info] = [info for info in taskplex.backends() if info.name == "mp"]
    assert info.server_class is MultiprocessingServer
    caps = info.capabilities
    assert caps.cancel_running
    assert caps.timeout_kills_work
    assert caps.survives_worker_death
    assert caps.worker_processes
    assert caps.forwards_logs
    assert caps.resources == frozenset({"cores"})


# ------------------------------------------------------------------------------- what crosses


def test_unpicklable_arguments_are_named_at_submit() -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with taskplex.Executor("mp", workers=1) as executor:
        with pytest.raises(SerializationError, match=r"argument 1 of the task: .*_thread\.lock"):
            executor.submit(mp_tasks.accept, "fine", lock)
        with pytest.raises(SerializationError, match=r"keyword argument 'guard' .*_thread\.lock"):
            executor.submit(mp_tasks.accept, text="fine", guard=lock)
        with pytest.raises(SerializationError, match=r"closure variable 'lock' holds .*_thread\.lock"):
            executor.submit(uses_lock)
        assert executor.submit(mp_tasks.shout, "still serving").result(timeout=BOUND) == (
            "still serving"
        )


def test_unpicklable_result_fails_only_its_task() -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        bad = executor.submit(mp_tasks.return_lock)
        good = executor.submit(mp_tasks.shout, "good")
        error = bad.exception(timeout=BOUND)
        assert isinstance(error, TaskplexError)
        assert "result" in str(error), str(error)
        assert "_thread.lock" in str(error), str(error)
        assert good.result(timeout=BOUND) == "good"


def test_log_records_with_tracebacks_reach_the_caller() -> None:
    name = "tests.mp.task_log"
    handler = Collect()
    records = handler.records
    task_logger = logging.getLogger(name)
    task_logger.addHandler(handler)
    try:
        with taskplex.Executor("mp", workers=1) as executor:
            executor.submit(mp_tasks.log_failure, name).result(timeout=BOUND)
            wait_for(lambda: bool(records), "the task's log record")
    finally:
        task_logger.removeHandler(handler)
    [record] = records
    assert record.getMessage() == "task failed with details"
    assert record.levelno == logging.ERROR
    assert record.exc_text is not None
    assert "ValueError: inner problem" in record.exc_text


def test_print_output_reaches_the_callers_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        assert executor.submit(mp_tasks.shout, "printed in a worker").result(timeout=BOUND)
    assert "printed in a worker" in capfd.readouterr().out


def test_results_name_the_worker_that_ran_them() -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        task = Task(mp_tasks.pid)
        pid = executor.submit_task(task).result(timeout=BOUND)
    assert task.worker == f"pid {pid}"


# ------------------------------------------------------------------------------- cores


def test_task_with_more_cores_than_workers_is_refused_at_submit() -> None:
    with (
        taskplex.Executor("mp", workers=2) as executor,
        pytest.raises(ResourceUnavailable, match="3 cores"),
    ):
        executor.submit_task(Task(mp_tasks.pid, resources={"cores": 3}))


def test_task_with_cores_keeps_that_many_workers_to_itself(tmp_path: Path) -> None:
    directory = str(tmp_path)
    with taskplex.Executor("mp", workers=3) as executor:
        wide = executor.submit_task(Task(mp_tasks.hold, (directory, "wide"), resources={"cores": 2}))
        wait_for((tmp_path / "wide.started").exists, "the two-core task to start")
        narrow = [executor.submit(mp_tasks.hold, directory, f"narrow{i}") for i in range(2)]
        wait_for((tmp_path / "narrow0.started").exists, "a one-core task on the third worker")
        time.sleep(0.5)  # give a wrongly started second one-core task the time to show
        assert not (tmp_path / "narrow1.started").exists(), (
            "a fourth task ran while a two-core task held two of three workers"
        )
        (tmp_path / "wide.release").touch()
        wide.result(timeout=BOUND)
        wait_for((tmp_path / "narrow1.started").exists, "the next task once the cores were free")
        for i in range(2):
            (tmp_path / f"narrow{i}.release").touch()
        for future in narrow:
            future.result(timeout=BOUND)
