"""The policy TaskServer owns for every backend: retries, timeouts, dependencies, names,
cancellation, stopping, the task queue, back-pressure, hooks and resources.

It is exercised through two small backends defined here — one runs each attempt as a coroutine
(:class:`~taskplex.backend.CoroutineBackend`), the other leaves every report to the test — and
through the async backend.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import taskplex
from taskplex import (
    Capabilities,
    DependencyFailed,
    DuplicateTaskName,
    InfrastructureError,
    Outcome,
    ResourceUnavailable,
    ResultsQueue,
    ServerNotRunning,
    Task,
    TaskCancelled,
    TaskServer,
    TaskStatus,
    TaskTimeout,
    WorkerLost,
)
from taskplex.backend import Attempt, Backend, CoroutineBackend
from taskplex_async import AsyncServer

BOUND = 30.0
"""Seconds a test waits for something that should happen, so that it fails instead of hanging."""

T = TypeVar("T")


# ------------------------------------------------------------------------------ test backends


class CallBackend(CoroutineBackend):
    """The smallest backend: calls the function on the loop, awaits what it returns."""

    capabilities = Capabilities(
        cancel_running=True, runs_coroutines=True, resources=frozenset({"cores"})
    )

    async def execute(self, attempt: Attempt) -> Any:
        task = attempt.task
        value = task.function(*task.args, **task.kwargs)
        return await value if inspect.isawaitable(value) else value


class CallServer(TaskServer):
    backend_class = CallBackend

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        super().__init__(CallBackend(), workers=workers, queue_size=queue_size)


class FlakyBackend(CallBackend):
    """Loses the worker on the first ``losses`` attempts of every task."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses

    async def execute(self, attempt: Attempt) -> Any:
        if attempt.number <= self.losses:
            raise WorkerLost(f"worker died during attempt {attempt.number}")
        return await super().execute(attempt)


def flaky_server(losses: int = 1, workers: int = 1) -> TaskServer:
    return TaskServer(FlakyBackend(losses), workers=workers)


class ManualBackend(Backend):
    """Attempts start at launch and end only when the test reports them through their handles."""

    capabilities = Capabilities(cancel_running=True, resources=frozenset({"cores"}))

    def __init__(self) -> None:
        self.launched: list[Attempt] = []
        self.aborted: list[Attempt] = []

    def launch(self, attempts: Sequence[Attempt]) -> None:
        for attempt in attempts:
            self.launched.append(attempt)
            attempt.started()

    def abort(self, attempt: Attempt) -> None:
        self.aborted.append(attempt)


class UnstoppableBackend(ManualBackend):
    """Like ManualBackend, but declares that running work cannot be cancelled."""

    capabilities = Capabilities()


class ManualServer(TaskServer):
    """A server on a ManualBackend, with shortcuts to what the backend saw."""

    backend: ManualBackend

    def __init__(self, *, workers: int = 1, queue_size: int = 0, unstoppable: bool = False) -> None:
        backend = UnstoppableBackend() if unstoppable else ManualBackend()
        super().__init__(backend, workers=workers, queue_size=queue_size)

    @property
    def launched(self) -> list[tuple[Task, Attempt]]:
        return [(attempt.task, attempt) for attempt in self.backend.launched]

    @property
    def aborted(self) -> list[Attempt]:
        return self.backend.aborted

    def launched_names(self) -> list[str | None]:
        return [attempt.task.name for attempt in self.backend.launched]

    @staticmethod
    def complete(
        task: Task, attempt: Attempt, *, result: Any = None, error: BaseException | None = None
    ) -> None:
        assert attempt.task is task
        if error is None:
            attempt.succeeded(result)
        else:
            attempt.failed(error)


# ------------------------------------------------------------------------------ helpers


def serve(server: TaskServer, scenario: Callable[[TaskServer], Awaitable[T]]) -> T:
    """Run ``scenario(server)`` with the server started in a task group; stop it afterwards."""

    async def main() -> T:
        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            try:
                return await asyncio.wait_for(scenario(server), BOUND)
            finally:
                await server.stop()

    return asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def results(queue: ResultsQueue, count: int) -> list[Task]:
    return [await asyncio.wait_for(queue.get(), BOUND) for _ in range(count)]


def nothing_left(queue: ResultsQueue) -> bool:
    return len(queue) == 0


def returns(value: T) -> Callable[[], T]:
    return lambda: value


def fails_times(times: int, error: BaseException) -> Callable[[], str]:
    """A function that raises ``error`` on its first ``times`` calls, then returns "ok"."""
    calls: list[None] = []

    def function() -> str:
        calls.append(None)
        if len(calls) <= times:
            raise error
        return "ok"

    return function


# ------------------------------------------------------------------------------ retries


@pytest.mark.parametrize(
    ("make_server", "function"),
    [
        (flaky_server, returns("ok")),
        # on the async backend the function itself reports the infrastructure error
        (AsyncServer, fails_times(1, WorkerLost("gone"))),
    ],
    ids=["lost-worker", "async-backend"],
)
def test_infrastructure_error_is_retried(
    make_server: Callable[[], TaskServer], function: Callable[[], str]
) -> None:
    queue = ResultsQueue()
    task = Task(function, retries=1, results_queue=queue)

    async def scenario(server: TaskServer) -> Task:
        await server.submit(task)
        return (await results(queue, 1))[0]

    server = make_server()
    done = serve(server, scenario)
    assert done is task
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result == "ok"
    assert task.attempts == 2
    assert server.stats.retried == 1
    assert nothing_left(queue)


def test_retries_are_bounded_then_the_infrastructure_error_is_delivered() -> None:
    queue = ResultsQueue()
    task = Task(returns("never"), retries=2, results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(task)
        await results(queue, 1)

    server = flaky_server(losses=10)
    serve(server, scenario)
    assert task.status is TaskStatus.FAILED
    assert isinstance(task.exception, WorkerLost)
    assert "attempt 3" in str(task.exception)
    assert task.attempts == 3
    assert server.stats.retried == 2


def test_without_retries_an_infrastructure_error_fails_the_task() -> None:
    queue = ResultsQueue()
    task = Task(returns("never"), results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(task)
        await results(queue, 1)

    serve(flaky_server(losses=1), scenario)
    assert isinstance(task.exception, InfrastructureError)
    assert task.attempts == 1


def test_user_errors_are_not_retried_by_default() -> None:
    queue = ResultsQueue()
    function = fails_times(1, ValueError("bad input"))
    task = Task(function, retries=3, results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(task)
        await results(queue, 1)

    server = CallServer()
    serve(server, scenario)
    assert task.status is TaskStatus.FAILED
    assert isinstance(task.exception, ValueError)
    assert task.attempts == 1
    assert server.stats.retried == 0


def test_user_errors_are_retried_when_asked() -> None:
    queue = ResultsQueue()
    task = Task(
        fails_times(2, ValueError("flaky")), retries=2, retry_user_errors=True, results_queue=queue
    )

    async def scenario(server: TaskServer) -> None:
        await server.submit(task)
        await results(queue, 1)

    serve(CallServer(), scenario)
    assert task.status is TaskStatus.SUCCEEDED
    assert task.attempts == 3


def test_stats_count_every_outcome() -> None:
    queue = ResultsQueue()
    flaky = Task(fails_times(1, WorkerLost("gone")), retries=1, results_queue=queue)
    fine = Task(returns(1), results_queue=queue)
    broken = Task(fails_times(1, KeyError("k")), results_queue=queue)
    dependent = Task(returns(2), depends_on=[broken], results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        for task in (flaky, fine, broken, dependent):
            await server.submit(task)
        await results(queue, 4)

    server = CallServer()
    serve(server, scenario)
    assert server.stats.as_dict() == {
        "submitted": 4,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 1,
        "retried": 1,
        "running": 0,
    }


# ------------------------------------------------------------------------------ timeouts


def test_timeout_fails_the_task_and_cancels_the_coroutine() -> None:
    queue = ResultsQueue()
    seen: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("finished")

    task = Task(slow, timeout=0.05, results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(task)
        await results(queue, 1)
        await until(lambda: bool(seen))

    serve(CallServer(), scenario)
    assert task.status is TaskStatus.FAILED
    assert isinstance(task.exception, TaskTimeout)
    assert "timeout of 0.05 s" in str(task.exception)
    assert seen == ["cancelled"]


def test_timed_out_attempt_keeps_its_slot_until_the_backend_reports_it_over() -> None:
    queue = ResultsQueue()
    first = Task(returns(1), name="first", timeout=0.05, results_queue=queue)
    second = Task(returns(2), name="second", results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(first)
        await server.submit(second)
        [timed_out] = await results(queue, 1)
        assert timed_out is first
        assert server.aborted == [server.launched[0][1]]
        await asyncio.sleep(0.05)
        assert server.launched_names() == ["first"], "the slot is still taken"
        server.complete(first, server.launched[0][1], result="too late")
        await until(lambda: len(server.launched) == 2)
        server.complete(second, server.launched[1][1], result=2)
        await results(queue, 1)

    serve(ManualServer(workers=1), scenario)  # type: ignore[arg-type]
    assert first.status is TaskStatus.FAILED
    assert isinstance(first.exception, TaskTimeout)
    assert first.result is None, "the late result is discarded"
    assert second.result == 2
    assert nothing_left(queue)


# ------------------------------------------------------------------------------ dependencies


def recorder(order: list[str], label: str) -> Callable[[], str]:
    def record() -> str:
        order.append(label)
        return label

    return record


def test_dependency_chain_runs_in_order() -> None:
    queue = ResultsQueue()
    order: list[str] = []
    a = Task(recorder(order, "a"), results_queue=queue)
    b = Task(recorder(order, "b"), depends_on=[a], results_queue=queue)
    c = Task(recorder(order, "c"), depends_on=[b], results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        for task in (c, b, a)[::-1]:
            await server.submit(task)
        await results(queue, 3)

    serve(CallServer(workers=3), scenario)
    assert order == ["a", "b", "c"]
    assert all(task.status is TaskStatus.SUCCEEDED for task in (a, b, c))


def test_diamond_dependencies_run_the_join_last_and_once() -> None:
    queue = ResultsQueue()
    order: list[str] = []
    top = Task(recorder(order, "top"), results_queue=queue)
    left = Task(recorder(order, "left"), depends_on=[top], results_queue=queue)
    right = Task(recorder(order, "right"), depends_on=[top], results_queue=queue)
    join = Task(recorder(order, "join"), depends_on=[left, right], results_queue=queue)

    async def scenario(server: TaskServer) -> list[Task]:
        for task in (top, left, right, join):
            await server.submit(task)
        return await results(queue, 4)

    delivered = serve(CallServer(workers=4), scenario)
    assert order[0] == "top"
    assert sorted(order[1:3]) == ["left", "right"]
    assert order[3:] == ["join"]
    assert delivered[-1] is join


def test_failed_dependency_cancels_its_dependents_transitively() -> None:
    queue = ResultsQueue()
    order: list[str] = []
    broken = Task(fails_times(1, RuntimeError("broken")), results_queue=queue)
    child = Task(recorder(order, "child"), depends_on=[broken], results_queue=queue)
    grandchild = Task(recorder(order, "grandchild"), depends_on=[child], results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        for task in (broken, child, grandchild):
            await server.submit(task)
        await results(queue, 3)

    serve(CallServer(workers=2), scenario)
    assert order == [], "dependents never ran"
    assert broken.status is TaskStatus.FAILED
    for task in (child, grandchild):
        assert task.status is TaskStatus.CANCELLED
        assert isinstance(task.exception, DependencyFailed)
    assert "failed" in str(child.exception)
    assert nothing_left(queue)


def test_cancelled_dependency_cancels_its_dependent() -> None:
    queue = ResultsQueue()
    order: list[str] = []
    withdrawn = Task(recorder(order, "withdrawn"))
    withdrawn.cancel()
    dependent = Task(recorder(order, "dependent"), depends_on=[withdrawn], results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(dependent)
        await results(queue, 1)

    serve(CallServer(), scenario)
    assert order == []
    assert isinstance(dependent.exception, DependencyFailed)
    assert "cancelled" in str(dependent.exception)


def test_dependency_not_submitted_to_this_server_is_rejected() -> None:
    stranger = Task(returns(1), name="stranger")
    dependent = Task(returns(2), depends_on=[stranger])

    async def scenario(server: TaskServer) -> None:
        with pytest.raises(ValueError, match="which was not submitted to this server") as info:
            await server.submit(dependent)
        assert "stranger" in str(info.value)

    server = CallServer()
    serve(server, scenario)
    assert dependent.status is TaskStatus.PENDING
    assert server.stats.submitted == 0


# ------------------------------------------------------------------------------ names


def test_duplicate_name_fails_only_that_submission() -> None:
    queue = ResultsQueue()
    first = Task(returns(1), name="sweep-1", results_queue=queue)
    again = Task(returns(2), name="sweep-1", results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(first)
        with pytest.raises(DuplicateTaskName, match="'sweep-1'"):
            await server.submit(again)
        await results(queue, 1)

    serve(CallServer(), scenario)
    assert first.status is TaskStatus.SUCCEEDED
    assert again.status is TaskStatus.PENDING
    assert nothing_left(queue)


def test_names_stay_reserved_until_the_server_stops() -> None:
    queue = ResultsQueue()

    async def finished_then_reused(server: TaskServer) -> None:
        await server.submit(Task(returns(1), name="unique", results_queue=queue))
        await results(queue, 1)
        with pytest.raises(DuplicateTaskName):
            await server.submit(Task(returns(2), name="unique"))

    async def after_restart(server: TaskServer) -> None:
        await server.submit(Task(returns(3), name="unique", results_queue=queue))
        assert (await results(queue, 1))[0].result == 3

    server = CallServer()
    serve(server, finished_then_reused)
    serve(server, after_restart)


# ------------------------------------------------------------------------------ cancellation


def test_cancelling_a_queued_task_prevents_its_execution() -> None:
    queue = ResultsQueue()
    running = Task(returns(1), name="running", results_queue=queue)
    waiting = Task(returns(2), name="waiting", results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(running)
        await server.submit(waiting)
        await until(lambda: len(server.launched) == 1)
        assert waiting.cancel() is True
        assert waiting.cancel() is True, "idempotent"
        [cancelled] = await results(queue, 1)
        assert cancelled is waiting
        server.complete(running, server.launched[0][1], result=1)
        await results(queue, 1)

    server = ManualServer(workers=1)
    serve(server, scenario)  # type: ignore[arg-type]
    assert server.launched_names() == ["running"]
    assert waiting.status is TaskStatus.CANCELLED
    assert isinstance(waiting.exception, TaskCancelled)
    assert waiting.started_at is None
    assert nothing_left(queue)


def test_cancel_from_another_thread() -> None:
    queue = ResultsQueue()
    running = Task(returns(1), results_queue=queue)
    waiting = Task(returns(2), results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(running)
        await server.submit(waiting)
        await until(lambda: len(server.launched) == 1)
        assert await asyncio.to_thread(waiting.cancel) is True
        assert (await results(queue, 1))[0] is waiting
        server.complete(running, server.launched[0][1], result=1)
        await results(queue, 1)

    server = ManualServer(workers=1)
    serve(server, scenario)  # type: ignore[arg-type]
    assert waiting.status is TaskStatus.CANCELLED
    assert len(server.launched) == 1


def test_cancelling_a_running_task_aborts_it_and_discards_its_late_report() -> None:
    queue = ResultsQueue()
    task = Task(returns(1), results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(task)
        await until(lambda: len(server.launched) == 1)
        assert task.cancel() is True
        await results(queue, 1)
        token = server.launched[0][1]
        assert server.aborted == [token]
        server.complete(task, token, result="late")
        await asyncio.sleep(0.01)

    serve(ManualServer(), scenario)  # type: ignore[arg-type]
    assert task.status is TaskStatus.CANCELLED
    assert task.result is None
    assert nothing_left(queue)


def test_running_task_of_a_backend_without_cancel_running_runs_to_its_end() -> None:
    queue = ResultsQueue()
    task = Task(returns(1), results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(task)
        await until(lambda: len(server.launched) == 1)
        assert task.cancel() is False
        assert await asyncio.to_thread(task.cancel) is False
        await asyncio.sleep(0.01)
        assert task.status is TaskStatus.RUNNING
        server.complete(task, server.launched[0][1], result="done")
        await results(queue, 1)

    server = ManualServer(unstoppable=True)
    serve(server, scenario)  # type: ignore[arg-type]
    assert server.aborted == []
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result == "done"


def test_cancelling_a_finished_task_does_nothing() -> None:
    queue = ResultsQueue()
    task = Task(returns(1), results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(task)
        await results(queue, 1)
        assert task.cancel() is False
        await asyncio.sleep(0.01)

    serve(CallServer(), scenario)
    assert task.status is TaskStatus.SUCCEEDED
    assert nothing_left(queue)


# ------------------------------------------------------------------------------ late reports (C17)


def test_duplicate_complete_is_delivered_once() -> None:
    queue = ResultsQueue()
    task = Task(returns(1), results_queue=queue)
    after = Task(returns(2), results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(task)
        await until(lambda: len(server.launched) == 1)
        token = server.launched[0][1]
        server.complete(task, token, result="first")
        server.complete(task, token, result="second")
        server.complete(task, token, error=WorkerLost("late"))
        await server.submit(after)
        await until(lambda: len(server.launched) == 2)
        server.complete(after, server.launched[1][1], result=2)
        await results(queue, 2)

    server = ManualServer(workers=1)
    serve(server, scenario)  # type: ignore[arg-type]
    assert task.result == "first"
    assert task.status is TaskStatus.SUCCEEDED
    assert server.stats.succeeded == 2
    assert nothing_left(queue)


def test_report_of_an_earlier_attempt_is_discarded_after_a_retry() -> None:
    queue = ResultsQueue()
    task = Task(returns(1), retries=1, results_queue=queue)

    async def scenario(server: ManualServer) -> None:
        await server.submit(task)
        await until(lambda: len(server.launched) == 1)
        stale = server.launched[0][1]
        server.complete(task, stale, error=WorkerLost("connection dropped"))
        await until(lambda: len(server.launched) == 2)
        server.complete(task, stale, result="stale")
        await asyncio.sleep(0.01)
        assert task.status is TaskStatus.RUNNING
        server.complete(task, server.launched[1][1], result="fresh")
        await results(queue, 1)
        await asyncio.sleep(0.01)

    serve(ManualServer(), scenario)  # type: ignore[arg-type]
    assert task.result == "fresh"
    assert task.attempts == 2
    assert nothing_left(queue)


# ------------------------------------------------------------------------------ lifecycle


def test_stop_cancels_running_and_queued_work() -> None:
    queue = ResultsQueue()
    running = Task(returns(1), name="running", results_queue=queue)
    queued = Task(returns(2), name="queued", results_queue=queue)
    parked = Task(returns(3), name="parked", depends_on=[running], results_queue=queue)

    async def main() -> ManualServer:
        server = ManualServer(workers=1)
        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            for task in (running, queued, parked):
                await server.submit(task)
            await until(lambda: len(server.launched) == 1)
            stopping = asyncio.ensure_future(server.stop())
            await until(lambda: len(server.aborted) == 1)
            assert not stopping.done(), "stop waits until the backend reports the aborted attempt"
            server.aborted[0].failed(TaskCancelled("stopped"))
            await asyncio.wait_for(stopping, BOUND)
            await asyncio.wait_for(server.stop(), BOUND)
            server.cancel()
            assert not server.is_running()
            with pytest.raises(ServerNotRunning, match="has stopped"):
                await server.submit(Task(returns(4)))
        return server

    server = asyncio.run(main())
    assert server.launched_names() == ["running"]
    assert server.aborted == [server.launched[0][1]]
    delivered = [queue.get_nowait() for _ in range(3)]
    assert {task.name for task in delivered} == {"running", "queued", "parked"}
    assert all(task.status is TaskStatus.CANCELLED for task in delivered)
    assert nothing_left(queue)


def test_stop_with_wait_lets_queued_work_finish() -> None:
    queue = ResultsQueue()

    async def quick(n: int) -> int:
        await asyncio.sleep(0.001)
        return n

    tasks = [Task(quick, (n,), results_queue=queue) for n in range(5)]

    async def main() -> None:
        server = CallServer(workers=1)
        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            for task in tasks:
                await server.submit(task)
            await asyncio.wait_for(server.stop(wait=True), BOUND)

    asyncio.run(main())
    assert [task.result for task in tasks] == list(range(5))
    assert len(queue) == 5


def test_a_stopped_server_starts_again() -> None:
    queue = ResultsQueue()

    async def run_one(server: TaskServer) -> Any:
        await server.submit(Task(returns("again"), results_queue=queue))
        return (await results(queue, 1))[0].result

    server = CallServer()
    assert serve(server, run_one) == "again"
    assert serve(server, run_one) == "again"
    assert server.stats.succeeded == 2


def test_starting_a_running_server_fails() -> None:
    async def scenario(server: TaskServer) -> None:
        assert server.task_group is not None
        with pytest.raises(RuntimeError, match="already running"):
            await server.start(server.task_group)
        assert server.is_running()

    serve(CallServer(), scenario)


def test_a_server_whose_startup_fails_can_be_stopped_and_started_again() -> None:
    class FlakyStart(CallBackend):
        failures = 1

        async def start(self, context: Any) -> None:
            if FlakyStart.failures:
                FlakyStart.failures -= 1
                raise OSError("no workers today")

    server = TaskServer(FlakyStart())

    async def main() -> None:
        async with asyncio.TaskGroup() as task_group:
            with pytest.raises(OSError, match="no workers today"):
                await server.start(task_group)
            assert not server.is_running()
            with pytest.raises(ServerNotRunning):
                await server.submit(Task(abs, (-1,)))
            # a cleanup that stops the server must return, not wait for a start that never was
            await asyncio.wait_for(server.stop(), BOUND)
            await server.start(task_group)
            results = ResultsQueue()
            await server.submit(Task(abs, (-1,), results_queue=results))
            assert (await asyncio.wait_for(results.get(), BOUND)).result == 1
            await server.stop()

    asyncio.run(main())


def test_loop_and_task_group_are_those_the_server_runs_in() -> None:
    server = CallServer()
    assert server.loop is None
    assert server.task_group is None
    assert not server.is_running()

    async def main() -> None:
        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            assert server.is_running()
            assert server.loop is asyncio.get_running_loop()
            assert server.task_group is task_group
            await server.stop()

    asyncio.run(main())
    assert not server.is_running()


def test_submit_to_a_server_never_started_says_how_to_fix_it() -> None:
    task = Task(returns(1))
    with pytest.raises(ServerNotRunning, match=r"call `await server\.start\(task_group\)` first"):
        asyncio.run(CallServer().submit(task))
    assert task.status is TaskStatus.PENDING


# ------------------------------------------------------------------------------ the task queue


def test_tasks_put_directly_on_the_task_queue_run() -> None:
    queue = ResultsQueue()
    tasks = [Task(returns(n), results_queue=queue) for n in range(3)]

    async def scenario(server: TaskServer) -> list[Task]:
        for task in tasks:
            await server.task_queue.put(task)
        return await results(queue, 3)

    server = CallServer()
    delivered = serve(server, scenario)
    assert sorted(task.result for task in delivered) == [0, 1, 2]
    assert all(task.status is TaskStatus.SUCCEEDED for task in tasks)
    assert server.stats.submitted == 3


def test_invalid_task_on_the_task_queue_is_delivered_failed() -> None:
    queue = ResultsQueue()
    first = Task(returns(1), name="twin", results_queue=queue)
    twin = Task(returns(2), name="twin", results_queue=queue)
    greedy = Task(returns(3), resources={"gpus": 1}, results_queue=queue)
    later = Task(returns(4), results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        await server.submit(first)
        await results(queue, 1)
        for task in (twin, greedy, later):
            await server.task_queue.put(task)
        await results(queue, 3)
        assert server.is_running()

    serve(CallServer(), scenario)
    assert twin.status is TaskStatus.FAILED
    assert isinstance(twin.exception, DuplicateTaskName)
    assert greedy.status is TaskStatus.FAILED
    assert isinstance(greedy.exception, ResourceUnavailable)
    assert later.result == 4


def test_full_task_queue_makes_submit_wait() -> None:
    queue = ResultsQueue()
    tasks = [Task(returns(n), name=f"t{n}", results_queue=queue) for n in range(3)]

    async def scenario(server: ManualServer) -> None:
        await server.submit(tasks[0])
        await until(lambda: len(server.launched) == 1)
        await server.submit(tasks[1])
        assert server.task_queue.full()
        third = asyncio.ensure_future(server.submit(tasks[2]))
        await asyncio.sleep(0.05)
        assert not third.done(), "submit waits while the queue is full"
        server.complete(tasks[0], server.launched[0][1], result=0)
        await asyncio.wait_for(third, BOUND)
        await until(lambda: len(server.launched) == 2)
        server.complete(tasks[1], server.launched[1][1], result=1)
        await until(lambda: len(server.launched) == 3)
        server.complete(tasks[2], server.launched[2][1], result=2)
        await results(queue, 3)

    serve(ManualServer(workers=1, queue_size=1), scenario)  # type: ignore[arg-type]
    assert [task.result for task in tasks] == [0, 1, 2]


# ------------------------------------------------------------------------------ hooks


class TaskEvents:
    """A plugin that records every task hook call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None]] = []

    def of(self, task: Task) -> list[str]:
        return [event for event, name in self.events if name == task.name]

    @taskplex.hookimpl
    def taskplex_task_submitted(self, task: Task) -> None:
        assert task.status is TaskStatus.QUEUED
        self.events.append(("submitted", task.name))

    @taskplex.hookimpl
    def taskplex_task_started(self, task: Task) -> None:
        assert task.status is TaskStatus.RUNNING
        self.events.append(("started", task.name))

    @taskplex.hookimpl
    def taskplex_task_finished(self, task: Task) -> None:
        assert task.done()
        self.events.append(("finished", task.name))

    @taskplex.hookimpl
    def taskplex_result_delivered(self, task: Task, results_queue: ResultsQueue) -> None:
        assert task.results_queue is results_queue
        self.events.append(("delivered", task.name))


class ServerEvents:
    """A plugin that records server hook calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @taskplex.hookimpl
    def taskplex_server_started(self, server: TaskServer) -> None:
        assert server.is_running()
        self.events.append("started")

    @taskplex.hookimpl
    def taskplex_server_stopped(self, server: TaskServer) -> None:
        assert not server.is_running()
        self.events.append("stopped")


def test_task_hooks_fire_once_each_in_order(register_plugin: Callable[[Any], None]) -> None:
    events = TaskEvents()
    register_plugin(events)
    queue = ResultsQueue()
    succeeds = Task(returns(1), name="succeeds", results_queue=queue)
    fails = Task(fails_times(1, ValueError("no")), name="fails", results_queue=queue)
    blocker = Task(asyncio.sleep, (BOUND,), name="blocker", results_queue=queue)
    cancelled_queued = Task(returns(2), name="cancelled-queued", results_queue=queue)
    dependent = Task(returns(3), name="dependent", depends_on=[fails], results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        for task in (succeeds, fails, dependent):
            await server.submit(task)
        await results(queue, 3)
        await server.submit(blocker)
        await server.submit(cancelled_queued)
        await until(lambda: blocker.status is TaskStatus.RUNNING)
        cancelled_queued.cancel()
        blocker.cancel()
        await results(queue, 2)

    serve(CallServer(workers=1), scenario)
    ran = ["submitted", "started", "finished", "delivered"]
    assert events.of(succeeds) == ran
    assert events.of(fails) == ran
    assert events.of(blocker) == ran
    assert events.of(cancelled_queued) == ["submitted", "finished", "delivered"]
    assert events.of(dependent) == ["submitted", "finished", "delivered"]


def test_server_hooks_fire_once_per_start_and_stop(
    register_plugin: Callable[[Any], None],
) -> None:
    events = ServerEvents()
    register_plugin(events)

    async def nothing(server: TaskServer) -> None:
        assert events.events[-1] == "started"

    server = CallServer()
    serve(server, nothing)
    serve(server, nothing)
    assert events.events == ["started", "stopped", "started", "stopped"]


class Cache:
    """A plugin that supplies outcomes for some tasks, as a result cache would."""

    @taskplex.hookimpl
    def taskplex_task_lookup(self, task: Task) -> Outcome | None:
        if task.name == "cached":
            return Outcome(result="from cache")
        if task.name == "known-bad":
            return Outcome(exception=ArithmeticError("failed last time"))
        return None


def touch(path: Path) -> str:
    path.touch()
    return "computed"


def test_lookup_outcome_skips_execution(register_plugin: Callable[[Any], None], tmp_path: Path) -> None:
    events = TaskEvents()
    register_plugin(Cache())
    register_plugin(events)
    queue = ResultsQueue()
    cached = Task(touch, (tmp_path / "cached",), name="cached", results_queue=queue)
    bad = Task(touch, (tmp_path / "bad",), name="known-bad", results_queue=queue)
    fresh = Task(touch, (tmp_path / "fresh",), name="fresh", results_queue=queue)

    async def scenario(server: TaskServer) -> None:
        for task in (cached, bad, fresh):
            await server.submit(task)
        await results(queue, 3)

    serve(CallServer(), scenario)
    assert not (tmp_path / "cached").exists()
    assert not (tmp_path / "bad").exists()
    assert (tmp_path / "fresh").exists()
    assert (cached.status, cached.result) == (TaskStatus.SUCCEEDED, "from cache")
    assert bad.status is TaskStatus.FAILED
    assert isinstance(bad.exception, ArithmeticError)
    assert fresh.result == "computed"
    assert "started" not in events.of(cached)
    assert events.of(fresh) == ["submitted", "started", "finished", "delivered"]


class BrokenPlugin:
    """A plugin that raises in every hook it implements."""

    @taskplex.hookimpl
    def taskplex_server_started(self) -> None:
        raise RuntimeError("plugin broke in server_started")

    @taskplex.hookimpl
    def taskplex_server_stopped(self) -> None:
        raise RuntimeError("plugin broke in server_stopped")

    @taskplex.hookimpl
    def taskplex_task_lookup(self) -> None:
        raise RuntimeError("plugin broke in lookup")

    @taskplex.hookimpl
    def taskplex_task_submitted(self) -> None:
        raise RuntimeError("plugin broke in submitted")

    @taskplex.hookimpl
    def taskplex_task_started(self) -> None:
        raise RuntimeError("plugin broke in started")

    @taskplex.hookimpl
    def taskplex_task_finished(self) -> None:
        raise RuntimeError("plugin broke in finished")

    @taskplex.hookimpl
    def taskplex_result_delivered(self) -> None:
        raise RuntimeError("plugin broke in delivered")


def test_a_plugin_raising_in_a_hook_does_not_break_the_server(
    register_plugin: Callable[[Any], None], caplog: pytest.LogCaptureFixture
) -> None:
    register_plugin(BrokenPlugin())
    queue = ResultsQueue()

    async def scenario(server: TaskServer) -> list[Any]:
        for n in range(3):
            await server.submit(Task(returns(n), results_queue=queue))
        return sorted(task.result for task in await results(queue, 3))

    server = CallServer(workers=2)
    with caplog.at_level(logging.ERROR, logger="taskplex"):
        assert serve(server, scenario) == [0, 1, 2]
        assert serve(server, scenario) == [0, 1, 2], "the server starts again after a broken stop"
    assert nothing_left(queue)
    logged = caplog.text
    for hook in ("server_started", "server_stopped", "lookup", "submitted", "finished"):
        assert f"plugin broke in {hook}" in logged


def test_task_hooks_are_looked_up_when_the_server_starts(
    register_plugin: Callable[[Any], None],
) -> None:
    events = TaskEvents()
    queue = ResultsQueue()
    before = Task(returns(1), name="before-restart", results_queue=queue)
    after = Task(returns(2), name="after-restart", results_queue=queue)

    async def register_then_run(server: TaskServer) -> None:
        register_plugin(events)
        await server.submit(before)
        await results(queue, 1)

    async def run(server: TaskServer) -> None:
        await server.submit(after)
        await results(queue, 1)

    server = CallServer()
    serve(server, register_then_run)
    serve(server, run)
    assert events.of(before) == [], "plugins registered while a server runs apply from its next start"
    assert events.of(after) == ["submitted", "started", "finished", "delivered"]


# ------------------------------------------------------------------------------ resources


def test_resources_beyond_the_backend_are_rejected_at_submit() -> None:
    async def scenario(server: TaskServer) -> None:
        with pytest.raises(ResourceUnavailable, match=r"resources\.gpus=1") as info:
            await server.submit(Task(returns(1), resources={"gpus": 1}))
        assert "cores" in str(info.value), "names the resources it honours"
        with pytest.raises(ResourceUnavailable, match=r"resources\.walltime"):
            await server.submit(Task(returns(1), resources={"walltime": 60}))
        with pytest.raises(ResourceUnavailable, match=r"3 cores .* workers=2"):
            await server.submit(Task(returns(1), resources={"cores": 3}))

    server = CallServer(workers=2)
    serve(server, scenario)
    assert server.stats.submitted == 0


def test_a_multi_core_task_takes_that_many_slots() -> None:
    queue = ResultsQueue()
    wide = [
        Task(returns(n), name=f"wide{n}", resources={"cores": 2}, results_queue=queue) for n in range(2)
    ]

    async def scenario(server: ManualServer) -> None:
        for task in wide:
            await server.submit(task)
        await until(lambda: len(server.launched) == 1)
        await asyncio.sleep(0.05)
        assert server.launched_names() == ["wide0"], "only one 2-core task fits in 3 slots"
        server.complete(wide[0], server.launched[0][1], result=0)
        await until(lambda: len(server.launched) == 2)
        server.complete(wide[1], server.launched[1][1], result=1)
        await results(queue, 2)

    serve(ManualServer(workers=3), scenario)  # type: ignore[arg-type]
    assert [task.result for task in wide] == [0, 1]


def test_stop_with_wait_runs_tasks_put_directly_on_the_task_queue() -> None:
    queue = ResultsQueue()
    tasks = [Task(returns(n), results_queue=queue) for n in range(3)]

    async def main() -> None:
        server = CallServer(workers=1)
        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            for task in tasks:
                server.task_queue.put_nowait(task)
            await asyncio.wait_for(server.stop(wait=True), BOUND)

    asyncio.run(main())
    assert [task.status for task in tasks] == [TaskStatus.SUCCEEDED] * 3
