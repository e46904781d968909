"""Errors: contracts C3 (user exceptions), C4 (infrastructure errors, retries), C14 (duplicate
names) and C19 (what can and cannot be serialised)."""

from __future__ import annotations

import functools
import threading
import traceback

import pytest

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
    bounded,
    collect,
    run,
)
from taskplex.conformance.requirements import requires
from taskplex.errors import (
    DuplicateTaskName,
    ResourceUnavailable,
    SerializationError,
    TaskplexError,
    UnpicklableError,
)
from taskplex.results import ResultsQueue
from taskplex.server import Capabilities
from taskplex.task import Task, TaskStatus


def _traceback_text(exc: BaseException) -> str:
    """The traceback as a user would see it, remote part (``__cause__``) included."""
    return "".join(traceback.format_exception(exc))


class FailureTests(SuiteBase):
    """C3, C4, C14, C19: failures stay with their task and say what went wrong."""

    # ------------------------------------------------------------------ C3

    def test_user_exception_fails_only_its_task(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server(workers=2)
        results = ResultsQueue()

        async def scenario() -> tuple[list[Task], Task, Task]:
            async with serve(server):
                good = [
                    await server.submit(Task(tasks.echo, (i,), results_queue=results)) for i in range(3)
                ]
                bad = await server.submit(Task(tasks.raise_failure, ("boom 17",), results_queue=results))
                good += [
                    await server.submit(Task(tasks.echo, (i,), results_queue=results))
                    for i in range(3, 6)
                ]
                assert_delivered_once(await collect(results, 7), [*good, bad])
                assert server.is_running(), "one failing task stopped the server"
                after = await server.submit(Task(tasks.echo, ("after",), results_queue=results))
                await collect(results, 1)
            return good, bad, after

        good, bad, after = run(scenario())
        assert [task.outcome() for task in good] == list(range(6))
        assert after.outcome() == "after"
        assert bad.status is TaskStatus.FAILED
        assert type(bad.exception) is tasks.TaskFailure, repr(bad.exception)
        assert str(bad.exception) == "boom 17"
        assert "raise_failure" in _traceback_text(bad.exception), (
            "the traceback of the task's exception should show where it was raised:\n"
            + _traceback_text(bad.exception)
        )

    def test_executor_future_raises_the_task_exception(self, make_executor: MakeExecutor) -> None:
        executor = make_executor(workers=2)
        bad = executor.submit(tasks.raise_failure, "boom 23")
        good = executor.submit(tasks.echo, 23)
        with pytest.raises(tasks.TaskFailure, match="boom 23") as caught:
            bad.result(timeout=bound())
        assert "raise_failure" in _traceback_text(caught.value)
        assert good.result(timeout=bound()) == 23

    def test_unpicklable_exception_keeps_type_name_and_message(
        self, make_executor: MakeExecutor
    ) -> None:
        executor = make_executor()
        future = executor.submit(tasks.raise_unpicklable, "cannot travel")
        exc = future.exception(timeout=bound())
        assert exc is not None
        if isinstance(exc, UnpicklableError):
            assert exc.type_name.endswith("UnpicklableFailure"), exc.type_name
            assert exc.message == "cannot travel"
        else:
            assert type(exc) is tasks.UnpicklableFailure, repr(exc)
            assert str(exc) == "cannot travel"
        assert "raise_unpicklable" in _traceback_text(exc)

    # ------------------------------------------------------------------ C23

    @pytest.mark.parametrize("kind", sorted(tasks.BASE_EXCEPTIONS))
    def test_base_exceptions_fail_only_their_task(
        self, make_server: MakeServer, serve: Serve, markers: Markers, kind: str
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        raiser = Task(
            tasks.raise_base_exception, (kind, str(markers.directory)), retries=2, results_queue=results
        )

        async def scenario() -> Task:
            async with serve(server):
                await server.submit(raiser)
                assert_delivered_once(await collect(results, 1), [raiser])
                assert server.is_running(), f"a task raising {kind} stopped the server"
                after = await server.submit(Task(tasks.echo, ("after",), results_queue=results))
                await collect(results, 1)
            return after

        after = run(scenario())
        assert raiser.status is TaskStatus.FAILED
        assert type(raiser.exception) is tasks.BASE_EXCEPTIONS[kind], (
            f"a task raising {kind} must fail with its own type, got {raiser.exception!r}"
        )
        assert raiser.attempts == 1, f"{kind} raised by the task was taken for a dead worker"
        assert markers.runs(kind) == 1
        assert after.outcome() == "after"

    # ------------------------------------------------------------------ C4

    def test_user_errors_are_not_retried_by_default(
        self, make_executor: MakeExecutor, markers: Markers
    ) -> None:
        executor = make_executor()
        task = Task(tasks.fail_until, (str(markers.directory), "flaky", 99), retries=3)
        future = executor.submit_task(task)
        assert isinstance(future.exception(timeout=bound()), tasks.TaskFailure)
        assert task.attempts == 1
        assert markers.runs("flaky") == 1

    def test_retried_user_errors_count_attempts(
        self, make_executor: MakeExecutor, markers: Markers
    ) -> None:
        executor = make_executor()
        task = Task(
            tasks.fail_until,
            (str(markers.directory), "flaky", 3),
            retries=2,
            retry_user_errors=True,
        )
        assert executor.submit_task(task).result(timeout=bound()) == 3
        assert task.status is TaskStatus.SUCCEEDED
        assert task.attempts == 3
        assert markers.runs("flaky") == 3

    def test_retries_are_bounded(self, make_server: MakeServer, serve: Serve, markers: Markers) -> None:
        server = make_server()
        results = ResultsQueue()
        task = Task(
            tasks.fail_until,
            (str(markers.directory), "hopeless", 99),
            retries=2,
            retry_user_errors=True,
            results_queue=results,
        )

        async def scenario() -> None:
            async with serve(server):
                await server.submit(task)
                assert_delivered_once(await collect(results, 1), [task])
            assert len(results) == 0, "a retried task was delivered more than once"

        run(scenario())
        assert task.status is TaskStatus.FAILED
        assert isinstance(task.exception, tasks.TaskFailure)
        assert task.attempts == 3
        assert markers.runs("hopeless") == 3

    @requires("pickles_tasks")
    def test_unpicklable_result_is_an_infrastructure_error(self, make_executor: MakeExecutor) -> None:
        executor = make_executor()
        exc = executor.submit(tasks.return_unpicklable).exception(timeout=bound())
        assert isinstance(exc, TaskplexError), (
            f"a result that cannot be sent back must fail as a taskplex error, got {exc!r}"
        )
        assert "lock" in str(exc), f"the error should name what could not be pickled: {exc}"
        assert executor.submit(tasks.echo, "still serving").result(timeout=bound()) == ("still serving")

    def test_undeclared_resources_are_refused_at_submit(
        self, make_executor: MakeExecutor, capabilities: Capabilities
    ) -> None:
        requests = {"cores": 2, "gpus": 1, "memory": 1024, "walltime": 60.0}
        undeclared = {k: v for k, v in requests.items() if k not in capabilities.resources}
        if not undeclared:
            pytest.skip("the backend declares it honours every kind of resource request")
        executor = make_executor(workers=2)
        for key, value in undeclared.items():
            with pytest.raises(ResourceUnavailable, match=key):
                executor.submit_task(Task(tasks.echo, (key,), resources={key: value}))
        assert executor.submit(tasks.echo, "plain").result(timeout=bound()) == "plain"

    # ------------------------------------------------------------------ C14

    def test_duplicate_name_fails_only_that_submission(
        self, make_server: MakeServer, serve: Serve
    ) -> None:
        server = make_server(workers=2)
        results = ResultsQueue()

        async def scenario() -> tuple[Task, Task, Task, Task]:
            async with serve(server):
                first = await server.submit(
                    Task(tasks.echo, ("first",), name="twin", results_queue=results)
                )
                second = Task(tasks.echo, ("second",), name="twin", results_queue=results)
                with pytest.raises(DuplicateTaskName, match="twin"):
                    await server.submit(second)
                # put straight on the task queue, the duplicate is delivered FAILED instead
                third = Task(tasks.echo, ("third",), name="twin", results_queue=results)
                await server.task_queue.put(third)
                other = await server.submit(
                    Task(tasks.echo, ("other",), name="other", results_queue=results)
                )
                assert_delivered_once(await collect(results, 3), [first, third, other])
            assert len(results) == 0
            return first, second, third, other

        first, second, third, other = run(scenario())
        assert first.outcome() == "first"
        assert other.outcome() == "other"
        assert second.status is TaskStatus.PENDING, "a refused task must stay unsubmitted"
        assert third.status is TaskStatus.FAILED
        assert isinstance(third.exception, DuplicateTaskName)

    def test_executor_duplicate_name_raises_at_submit(self, make_executor: MakeExecutor) -> None:
        executor = make_executor()
        first = executor.submit_task(Task(tasks.echo, (1,), name="twin"))
        with pytest.raises(DuplicateTaskName):
            executor.submit_task(Task(tasks.echo, (2,), name="twin"))
        assert first.result(timeout=bound()) == 1
        assert executor.submit(tasks.echo, 3).result(timeout=bound()) == 3

    # ------------------------------------------------------------------ C19

    def test_lambdas_closures_and_local_functions_run(self, make_executor: MakeExecutor) -> None:
        executor = make_executor(workers=2)
        offset = 1000

        def add_offset(value: int) -> int:
            return value + offset

        def scaled(factor: int, value: int) -> int:
            return factor * value

        futures = [
            executor.submit(lambda value: value * 2, 21),
            executor.submit(add_offset, 7),
            executor.submit(functools.partial(scaled, 3), 5),
        ]
        assert [f.result(timeout=bound()) for f in futures] == [42, 1007, 15]

    @requires("pickles_tasks")
    def test_unpicklable_argument_fails_at_submit(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server()
        results = ResultsQueue()
        refused = Task(tasks.echo, (threading.Lock(),), results_queue=results)

        async def scenario() -> Task:
            async with serve(server):
                with pytest.raises(SerializationError) as caught:
                    await bounded(server.submit(refused), "a submit that must fail")
                assert "lock" in str(caught.value), (
                    f"the error should name what could not be pickled: {caught.value}"
                )
                fine = await server.submit(Task(tasks.echo, ("fine",), results_queue=results))
                await collect(results, 1)
            return fine

        assert run(scenario()).outcome() == "fine"
        assert refused.status is TaskStatus.PENDING

    @requires("pickles_tasks")
    def test_unpicklable_function_fails_at_submit(self, make_executor: MakeExecutor) -> None:
        executor = make_executor()
        lock = threading.Lock()

        def uses_lock() -> bool:
            return lock.locked()

        with pytest.raises(SerializationError) as caught:
            executor.submit(uses_lock)
        assert "lock" in str(caught.value), (
            f"the error should name what could not be pickled: {caught.value}"
        )
        assert executor.submit(tasks.echo, 1).result(timeout=bound()) == 1


class TestFailures(FailureTests):
    backend = EVERY_INSTALLED_BACKEND
