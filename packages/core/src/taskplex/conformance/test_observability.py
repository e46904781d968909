"""What a caller can observe: contracts C11 (lifecycle hooks) and C22 (log records)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import pytest

from taskplex import plugins
from taskplex.conformance import _tasks as tasks
from taskplex.conformance._base import (
    EVERY_INSTALLED_BACKEND,
    MakeExecutor,
    MakeServer,
    Serve,
    SuiteBase,
)
from taskplex.conformance._support import (
    Markers,
    assert_delivered_once,
    bound,
    bounded_call,
    collect,
    occupy_every_executor_slot,
    occupy_every_slot,
    run,
    wait_until,
)
from taskplex.conformance.requirements import requires
from taskplex.plugins import hookimpl
from taskplex.results import ResultsQueue
from taskplex.server import Server
from taskplex.task import Task

RAN = ["submitted", "started", "finished", "delivered"]
NEVER_RAN = ["submitted", "finished", "delivered"]


class HookRecorder:
    """A plugin recording every lifecycle hook call, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.task_events: list[tuple[str, str]] = []
        self.server_events: list[tuple[str, Server]] = []

    def of(self, task: Task) -> list[str]:
        """The hooks called for ``task``, in order."""
        with self._lock:
            return [event for event, task_id in self.task_events if task_id == task.id]

    def of_server(self, server: Server) -> list[str]:
        with self._lock:
            return [event for event, seen in self.server_events if seen is server]

    def _task(self, event: str, task: Task) -> None:
        with self._lock:
            self.task_events.append((event, task.id))

    def _server(self, event: str, server: Server) -> None:
        with self._lock:
            self.server_events.append((event, server))

    @hookimpl
    def taskplex_task_submitted(self, task: Task) -> None:
        self._task("submitted", task)

    @hookimpl
    def taskplex_task_started(self, task: Task) -> None:
        self._task("started", task)

    @hookimpl
    def taskplex_task_finished(self, task: Task) -> None:
        self._task("finished", task)

    @hookimpl
    def taskplex_result_delivered(self, task: Task) -> None:
        self._task("delivered", task)

    @hookimpl
    def taskplex_server_started(self, server: Server) -> None:
        self._server("started", server)

    @hookimpl
    def taskplex_server_stopped(self, server: Server) -> None:
        self._server("stopped", server)


class _RecordList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in list(self.records)]


class ObservabilityTests(SuiteBase):
    """C11, C22: hooks fire once per task in order; log records reach the caller."""

    @pytest.fixture
    def hook_recorder(self) -> Iterator[HookRecorder]:
        """A registered :class:`HookRecorder`; register before starting: servers snapshot hooks."""
        recorder = HookRecorder()
        plugins.pm.register(recorder)
        try:
            yield recorder
        finally:
            plugins.pm.unregister(recorder)

    # ------------------------------------------------------------------ C11

    def test_hooks_fire_once_per_task_in_order(
        self,
        hook_recorder: HookRecorder,
        make_server: MakeServer,
        serve: Serve,
        markers: Markers,
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> tuple[list[Task], list[Task]]:
            async with serve(server):
                blockers = await occupy_every_slot(server, markers, results)
                cancelled = await server.submit(markers.task("cancelled", results_queue=results))
                cancelled.cancel()
                ok = await server.submit(Task(tasks.echo, (1,), results_queue=results))
                failed = await server.submit(
                    Task(tasks.raise_failure, ("hooked",), results_queue=results)
                )
                orphan = await server.submit(
                    markers.task("orphan", depends_on=[failed], results_queue=results)
                )
                markers.release_blockers(blockers)
                everything = [*blockers, cancelled, ok, failed, orphan]
                assert_delivered_once(await collect(results, len(everything)), everything)
            return [*blockers, ok, failed], [cancelled, orphan]

        ran, never_ran = run(scenario())
        for task in ran:
            assert hook_recorder.of(task) == RAN, repr(task)
        for task in never_ran:
            assert hook_recorder.of(task) == NEVER_RAN, repr(task)
        assert hook_recorder.of_server(server) == ["started", "stopped"]

    def test_hooks_fire_for_executor_tasks(
        self,
        hook_recorder: HookRecorder,
        make_executor: MakeExecutor,
        markers: Markers,
    ) -> None:
        executor = make_executor(workers=1)
        blockers = occupy_every_executor_slot(executor, markers)
        cancelled = Task(tasks.echo, ("never",))
        assert executor.submit_task(cancelled).cancel()
        failed = Task(tasks.raise_failure, ("hooked",))
        failed_future = executor.submit_task(failed)
        markers.release_blockers(blockers)
        assert isinstance(failed_future.exception(timeout=bound()), tasks.TaskFailure)
        bounded_call(executor.shutdown, "Executor.shutdown()")
        for task in [*(future.task for future in blockers), failed]:
            assert hook_recorder.of(task) == RAN, repr(task)
        assert hook_recorder.of(cancelled) == NEVER_RAN
        assert hook_recorder.of_server(executor.server) == ["started", "stopped"]

    # ------------------------------------------------------------------ C22

    @requires("forwards_logs")
    def test_task_log_records_reach_the_caller(self, make_executor: MakeExecutor) -> None:
        name = f"taskplex.conformance.task_log.{uuid.uuid4().hex}"
        handler = _RecordList()
        task_logger = logging.getLogger(name)
        task_logger.addHandler(handler)
        root = logging.getLogger()
        root_level = root.level
        # configured before the server starts, as a program would; backends may copy it then
        root.setLevel(logging.INFO)
        try:
            executor = make_executor()
            executor.submit(tasks.emit_log_records, name).result(timeout=bound())
            wait_until(
                lambda: any(m.startswith("holding ") for m in handler.messages()),
                "the task's log records to reach the caller",
            )
        finally:
            root.setLevel(root_level)
            task_logger.removeHandler(handler)
        messages = handler.messages()
        assert "visible record 42" in messages
        assert "below the configured level" not in messages, (
            "a DEBUG record arrived although the configured level is INFO"
        )
        unpicklable = next(m for m in messages if m.startswith("holding "))
        assert "_thread.lock object" in unpicklable, (
            f"a record with an unpicklable argument should arrive formatted: {unpicklable!r}"
        )
        visible = next(r for r in handler.records if r.getMessage() == "visible record 42")
        assert visible.levelno == logging.INFO
        assert visible.name == name

    def test_levels_changed_after_start_reach_running_workers(self, make_executor: MakeExecutor) -> None:
        name = f"taskplex.conformance.live_levels.{uuid.uuid4().hex}"
        handler = _RecordList()
        task_logger = logging.getLogger(name)
        task_logger.addHandler(handler)
        task_logger.setLevel(logging.WARNING)
        try:
            executor = make_executor(workers=1)
            executor.submit(tasks.emit_log_records, name).result(timeout=bound())
            # the worker is up and was told WARNING; the caller now wants DEBUG from this logger
            task_logger.setLevel(logging.DEBUG)
            executor.submit(tasks.emit_log_records, name).result(timeout=bound())
            wait_until(
                lambda: "below the configured level" in handler.messages(),
                "a DEBUG record, after the caller lowered the level to DEBUG while workers ran",
            )
        finally:
            task_logger.setLevel(logging.NOTSET)
            task_logger.removeHandler(handler)


class TestObservability(ObservabilityTests):
    backend = EVERY_INSTALLED_BACKEND
