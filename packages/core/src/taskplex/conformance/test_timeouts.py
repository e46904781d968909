"""Work that does not end on its own: contracts C15 (timeouts), C16 (killed workers) and C17 (late
or duplicate results)."""

from __future__ import annotations

from taskplex.conformance import _tasks as tasks
from taskplex.conformance._base import EVERY_INSTALLED_BACKEND, MakeServer, Serve, SuiteBase
from taskplex.conformance._support import (
    Markers,
    assert_clean,
    assert_delivered_once,
    collect,
    grace,
    run,
    settle,
    warm_up,
)
from taskplex.conformance.provider import Leftovers
from taskplex.conformance.requirements import requires
from taskplex.errors import TaskTimeout, WorkerLost
from taskplex.results import ResultsQueue
from taskplex.server import Capabilities
from taskplex.task import Task, TaskStatus

TIMEOUT = 0.5
"""The per-task timeout used here; the tasks it applies to would otherwise wait bound() seconds."""


class TimeoutTests(SuiteBase):
    """C15, C16, C17: timeouts and dead workers end tasks once, and the server goes on serving."""

    # ------------------------------------------------------------------ C15

    def test_timeout_fails_the_task(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> tuple[Task, Task]:
            async with serve(server):
                slow = await server.submit(
                    markers.task("slow", hold=True, timeout=TIMEOUT, results_queue=results)
                )
                assert_delivered_once(await collect(results, 1), [slow])
                # whether or not its work was stopped, the server must serve the next task
                markers.release("slow")
                after = await server.submit(markers.task("after", results_queue=results))
                await collect(results, 1)
            return slow, after

        slow, after = run(scenario())
        assert slow.status is TaskStatus.FAILED
        assert isinstance(slow.exception, TaskTimeout), repr(slow.exception)
        assert after.status is TaskStatus.SUCCEEDED

    @requires("timeout_kills_work")
    def test_timeout_kills_the_work(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> tuple[Task, Task]:
            async with serve(server):
                slow = await server.submit(
                    markers.task("slow", hold=True, timeout=TIMEOUT, results_queue=results)
                )
                await markers.until("slow")
                await collect(results, 1)
                # on a remote worker the stop may land after the task was delivered: give the
                # backend a grace to report the attempt over, but not a wait long enough for the
                # held work to give up by itself (work that was not stopped must reach 'done')
                await settle(lambda: server.stats.running == 0, grace())
                markers.release("slow")
                await markers.assert_never("slow", stage="done")
                # the worker is usable again
                after = await server.submit(markers.task("after", results_queue=results))
                await collect(results, 1)
            return slow, after

        slow, after = run(scenario())
        assert isinstance(slow.exception, TaskTimeout), repr(slow.exception)
        assert after.status is TaskStatus.SUCCEEDED

    # ------------------------------------------------------------------ C17

    def test_late_result_after_timeout_is_discarded(
        self,
        make_server: MakeServer,
        serve: Serve,
        markers: Markers,
        capabilities: Capabilities,
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                slow = await server.submit(
                    markers.task("slow", hold=True, timeout=TIMEOUT, results_queue=results)
                )
                await markers.until("slow")
                await collect(results, 1)
                markers.release("slow")
                if not capabilities.timeout_kills_work:
                    await markers.until("slow", "done")
                # one more task through the same worker: the late report is handled by then
                await server.submit(markers.task("after", results_queue=results))
                (after,) = await collect(results, 1)
                assert after.outcome() == "after", "a late result was delivered again"
            assert len(results) == 0, "the late result of a timed-out task was delivered"
            return slow

        slow = run(scenario())
        assert slow.status is TaskStatus.FAILED
        assert isinstance(slow.exception, TaskTimeout)
        assert slow.result is None

    # ------------------------------------------------------------------ C16

    @requires("survives_worker_death")
    def test_killed_worker_fails_its_task_after_retries(
        self,
        make_server: MakeServer,
        serve: Serve,
        markers: Markers,
        leftovers: Leftovers,
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        victim = Task(
            tasks.wait_to_be_killed,
            (str(markers.directory), "victim"),
            retries=1,
            results_queue=results,
        )

        async def scenario() -> Task:
            async with serve(server):
                await server.submit(victim)
                await markers.kill_worker("victim", 1)
                await markers.kill_worker("victim", 2)
                assert_delivered_once(await collect(results, 1), [victim])
                after = await server.submit(Task(tasks.echo, ("after",), results_queue=results))
                await collect(results, 1)
            assert len(results) == 0, "a task whose worker died was delivered more than once"
            return after

        after = run(scenario())
        assert victim.status is TaskStatus.FAILED
        assert isinstance(victim.exception, WorkerLost), repr(victim.exception)
        assert victim.attempts == 2
        assert markers.runs("victim") == 2
        assert after.outcome() == "after"
        assert_clean(leftovers)

    @requires("survives_worker_death")
    def test_tasks_held_by_a_killed_worker_are_delivered_once(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        directory = str(markers.directory)
        victim = Task(
            tasks.wait_to_be_killed, (directory, "victim", 2), retries=1, results_queue=results
        )

        async def scenario() -> list[Task]:
            async with serve(server):
                await warm_up(server)
                await server.submit(victim)
                await markers.worker("victim", 1)
                # behind the victim: what the backend hands its worker ahead of time, and more
                behind = [
                    await server.submit(
                        Task(tasks.count_run, (directory, f"behind{i}"), results_queue=results)
                    )
                    for i in range(2 * server.launch_limit + 2)
                ]
                await markers.kill_worker("victim", 1)
                assert_delivered_once(await collect(results, 1 + len(behind)), [victim, *behind])
            assert len(results) == 0, "a task held by a killed worker was delivered twice"
            return behind

        behind = run(scenario())
        assert victim.status is TaskStatus.SUCCEEDED, repr(victim.exception)
        assert victim.attempts == 2
        for i, task in enumerate(behind):
            assert task.outcome() == f"behind{i}"
            assert markers.runs(f"behind{i}") == 1, f"behind{i} ran {markers.runs(f'behind{i}')} times"
            assert task.attempts == 1, "a task its worker never started was counted an attempt"

    @requires("survives_worker_death")
    def test_killed_worker_task_is_retried(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        victim = Task(
            tasks.wait_to_be_killed,
            (str(markers.directory), "victim", 2),
            retries=1,
            results_queue=results,
        )

        async def scenario() -> None:
            async with serve(server):
                await server.submit(victim)
                await markers.kill_worker("victim", 1)
                assert_delivered_once(await collect(results, 1), [victim])
            assert len(results) == 0

        run(scenario())
        assert victim.status is TaskStatus.SUCCEEDED, repr(victim.exception)
        assert victim.result == 2
        assert victim.attempts == 2


class TestTimeouts(TimeoutTests):
    backend = EVERY_INSTALLED_BACKEND
