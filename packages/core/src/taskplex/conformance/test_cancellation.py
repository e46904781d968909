"""Cancellation: contracts C5 (cancelling tasks) and C6 (dependencies that fail or are cancelled)."""

from __future__ import annotations

import asyncio
import threading

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
    await_until,
    bound,
    bounded,
    bounded_call,
    collect,
    grace,
    occupy_every_executor_slot,
    occupy_every_slot,
    run,
    settle,
    warm_up,
)
from taskplex.conformance.requirements import lacks, requires
from taskplex.errors import DependencyFailed, TaskCancelled
from taskplex.results import ResultsQueue
from taskplex.server import Capabilities
from taskplex.task import Task, TaskStatus


class CancellationTests(SuiteBase):
    """C5, C6: a cancelled task never runs; cancellation reaches the tasks that depend on it."""

    # ------------------------------------------------------------------ C5

    def test_cancelled_queued_task_never_runs(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> tuple[list[Task], Task]:
            async with serve(server):
                blockers = await occupy_every_slot(server, markers, results)
                queued = await server.submit(markers.task("queued", results_queue=results))
                assert queued.cancel() is True
                markers.release_blockers(blockers)
                everything = [*blockers, queued]
                assert_delivered_once(await collect(results, len(everything)), everything)
                await markers.assert_never("queued", stage="started")
            assert len(results) == 0
            return blockers, queued

        blockers, queued = run(scenario())
        assert all(blocker.status is TaskStatus.SUCCEEDED for blocker in blockers)
        assert queued.status is TaskStatus.CANCELLED
        assert isinstance(queued.exception, TaskCancelled)

    def test_cancel_is_idempotent_and_thread_safe(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        answers: list[bool] = []

        async def scenario() -> Task:
            async with serve(server):
                blockers = await occupy_every_slot(server, markers, results)
                queued = await server.submit(markers.task("queued", results_queue=results))
                start = threading.Barrier(8)

                def cancel_from_a_thread() -> None:
                    start.wait(bound())
                    answers.append(queued.cancel())

                threads = [threading.Thread(target=cancel_from_a_thread) for _ in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    bounded_call(thread.join, "a thread calling cancel()")
                answers.append(queued.cancel())
                markers.release_blockers(blockers)
                everything = [*blockers, queued]
                assert_delivered_once(await collect(results, len(everything)), everything)
                await markers.assert_never("queued", stage="started")
            assert len(results) == 0, "a task cancelled many times was delivered more than once"
            return queued

        queued = run(scenario())
        assert answers == [True] * 9
        assert queued.status is TaskStatus.CANCELLED

    def test_cancelling_a_finished_task_is_a_no_op(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server()
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                task = await server.submit(Task(tasks.echo, ("kept",), results_queue=results))
                await collect(results, 1)
                assert task.cancel() is False
                assert bounded_call(task.cancel, "cancel() from another thread") is False
            assert len(results) == 0, "cancelling a finished task delivered it again"
            return task

        task = run(scenario())
        assert task.status is TaskStatus.SUCCEEDED
        assert task.result == "kept"

    def test_executor_cancel_queued_future(self, make_executor: MakeExecutor, markers: Markers) -> None:
        executor = make_executor(workers=1)
        blockers = occupy_every_executor_slot(executor, markers)
        queued = executor.submit(tasks.touch_and_wait, *markers.args("queued"))
        assert queued.cancel() is True
        assert queued.cancelled()
        markers.release_blockers(blockers)
        outcomes = [future.result(timeout=bound()) for future in blockers]
        assert outcomes == [f"blocker{i}" for i in range(len(blockers))]
        bounded_call(executor.shutdown, "Executor.shutdown()")
        assert not markers.has("queued", "started")

    @requires("withdraws_launched")
    def test_cancelled_launched_task_never_starts(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> list[Task]:
            async with serve(server):
                await warm_up(server)
                blocker = await server.submit(markers.task("blocker", hold=True, results_queue=results))
                await markers.until("blocker")
                # as many as the backend takes ahead of its worker, and one more that stays queued
                ahead = server.launch_limit - server.workers
                extra = [
                    await server.submit(markers.task(f"extra{i}", results_queue=results))
                    for i in range(ahead + 1)
                ]
                await await_until(
                    lambda: sum(task.launched_at is not None for task in extra) >= ahead,
                    f"{ahead} task(s) to be handed to the backend ahead of its worker",
                )
                for task in extra:
                    running = f"{task!r} was reported running while the only worker runs another"
                    assert task.status is TaskStatus.QUEUED, running
                    assert task.started_at is None, running
                    assert task.cancel() is True, f"cancel() of {task!r}, which had not started"
                    assert task.cancelled()
                markers.release("blocker")
                everything = [blocker, *extra]
                assert_delivered_once(await collect(results, len(everything)), everything)
                await markers.assert_never(*(f"extra{i}" for i in range(len(extra))), stage="started")
                after = await server.submit(markers.task("after", results_queue=results))
                await collect(results, 1)
                assert after.outcome() == "after"
            return extra

        for task in run(scenario()):
            assert task.status is TaskStatus.CANCELLED
            assert isinstance(task.exception, TaskCancelled)

    def test_stop_withdraws_tasks_that_have_not_started(
        self, make_server: MakeServer, serve: Serve, markers: Markers, capabilities: Capabilities
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> list[Task]:
            async with serve(server):
                await warm_up(server)
                blocker = await server.submit(markers.task("blocker", hold=True, results_queue=results))
                await markers.until("blocker")
                ahead = server.launch_limit - server.workers
                extra = [
                    await server.submit(markers.task(f"extra{i}", results_queue=results))
                    for i in range(ahead + 1)
                ]
                await await_until(
                    lambda: sum(task.launched_at is not None for task in extra) >= ahead,
                    f"{ahead} task(s) to be handed to the backend ahead of its worker",
                )
                stopping = asyncio.ensure_future(server.stop())
                if not capabilities.cancel_running:
                    await await_until(lambda: all(task.done() for task in extra), "extras cancelled")
                    markers.release("blocker")
                await bounded(stopping, "server.stop() with launched and queued tasks")
                assert_delivered_once(await collect(results, 1 + len(extra)), [blocker, *extra])
                markers.release("blocker")
                await markers.assert_never(*(f"extra{i}" for i in range(len(extra))), stage="started")
            return extra

        for task in run(scenario()):
            assert task.status is TaskStatus.CANCELLED, repr(task)

    @requires("cancel_running")
    def test_cancel_running_task_stops_its_work(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> tuple[Task, Task]:
            async with serve(server):
                running = await server.submit(markers.task("running", hold=True, results_queue=results))
                await markers.until("running")
                assert running.cancel() is True
                assert_delivered_once(await collect(results, 1), [running])
                # on a remote worker the stop may land after the task was delivered: give the
                # backend a grace to report the attempt over, but not a wait long enough for the
                # held work to give up by itself (work that was not stopped must reach 'done')
                await settle(lambda: server.stats.running == 0, grace())
                markers.release("running")
                await markers.assert_never("running", stage="done")
                # the worker is usable again
                after = await server.submit(markers.task("after", results_queue=results))
                await collect(results, 1)
            assert len(results) == 0
            return running, after

        running, after = run(scenario())
        assert running.status is TaskStatus.CANCELLED
        assert isinstance(running.exception, TaskCancelled)
        assert after.status is TaskStatus.SUCCEEDED

    @lacks("cancel_running")
    def test_cancel_running_task_lets_it_finish(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                running = await server.submit(markers.task("running", hold=True, results_queue=results))
                await markers.until("running")
                assert running.cancel() is False, (
                    "a backend without cancel_running cannot stop a running task, so cancel() "
                    "must say it did not"
                )
                markers.release("running")
                assert_delivered_once(await collect(results, 1), [running])
            assert len(results) == 0
            return running

        running = run(scenario())
        assert running.status is TaskStatus.SUCCEEDED
        assert running.result == "running"

    # ------------------------------------------------------------------ C6

    def test_failed_dependency_cancels_dependents(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=2)
        results = ResultsQueue()

        async def scenario() -> list[Task]:
            async with serve(server):
                failing = await server.submit(
                    Task(tasks.raise_failure, ("upstream",), results_queue=results)
                )
                child = await server.submit(
                    markers.task("child", depends_on=[failing], results_queue=results)
                )
                grandchild = await server.submit(
                    markers.task("grandchild", depends_on=[child], results_queue=results)
                )
                assert_delivered_once(await collect(results, 3), [failing, child, grandchild])
                late = await server.submit(
                    markers.task("late", depends_on=[failing], results_queue=results)
                )
                await collect(results, 1)
                await markers.assert_never("child", "grandchild", "late", stage="started")
            assert len(results) == 0
            return [child, grandchild, late]

        for dependent in run(scenario()):
            assert dependent.status is TaskStatus.CANCELLED, repr(dependent)
            assert isinstance(dependent.exception, DependencyFailed), repr(dependent.exception)

    def test_cancelled_dependency_cancels_dependents(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                blockers = await occupy_every_slot(server, markers, results)
                queued = await server.submit(markers.task("queued", results_queue=results))
                dependent = await server.submit(
                    markers.task("dependent", depends_on=[queued], results_queue=results)
                )
                queued.cancel()
                markers.release_blockers(blockers)
                everything = [*blockers, queued, dependent]
                assert_delivered_once(await collect(results, len(everything)), everything)
                await markers.assert_never("queued", "dependent", stage="started")
            return dependent

        dependent = run(scenario())
        assert dependent.status is TaskStatus.CANCELLED
        assert isinstance(dependent.exception, DependencyFailed)

    def test_dependent_runs_after_its_dependency_succeeds(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=2)
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                upstream = await server.submit(
                    markers.task("upstream", hold=True, results_queue=results)
                )
                saw_upstream_done = await server.submit(
                    Task(
                        tasks.path_exists,
                        (str(markers.path("upstream", "done")),),
                        depends_on=[upstream],
                        results_queue=results,
                    )
                )
                await markers.until("upstream")
                markers.release("upstream")
                assert_delivered_once(await collect(results, 2), [upstream, saw_upstream_done])
            return saw_upstream_done

        assert run(scenario()).outcome() is True, "the dependent ran before its dependency ended"


class TestCancellation(CancellationTests):
    backend = EVERY_INSTALLED_BACKEND
