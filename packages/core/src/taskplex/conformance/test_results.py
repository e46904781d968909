"""Getting results back: contract C20 (results stay retrievable until close)."""

from __future__ import annotations

import asyncio

import pytest

from taskplex.conformance import _tasks as tasks
from taskplex.conformance._base import (
    EVERY_INSTALLED_BACKEND,
    MakeExecutor,
    MakeServer,
    Serve,
    SuiteBase,
)
from taskplex.conformance._support import await_until, bound, bounded, bounded_call, collect, run
from taskplex.errors import QueueClosed
from taskplex.results import ResultsQueue
from taskplex.task import Task, TaskStatus


class ResultsTests(SuiteBase):
    """C20: finished tasks can be read after the server stopped, and not after close()."""

    def test_futures_keep_results_after_shutdown(self, make_executor: MakeExecutor) -> None:
        executor = make_executor(workers=2)
        good = [executor.submit(tasks.echo, i) for i in range(4)]
        bad = executor.submit(tasks.raise_failure, "kept")
        bounded_call(executor.shutdown, "Executor.shutdown()")
        assert [future.result(timeout=0) for future in good] == [0, 1, 2, 3]
        with pytest.raises(tasks.TaskFailure, match="kept"):
            bad.result(timeout=0)

    def test_results_queue_keeps_results_until_closed(
        self, make_server: MakeServer, serve: Serve
    ) -> None:
        server = make_server(workers=2)
        results = ResultsQueue()

        async def scenario() -> None:
            async with serve(server):
                submitted = [
                    await server.submit(Task(tasks.echo, (i,), results_queue=results)) for i in range(3)
                ]
                await await_until(lambda: all(task.done() for task in submitted), "the tasks to finish")
            assert not server.is_running()
            first = results.get_nowait()
            rest = await collect(results, 2)
            assert sorted(task.outcome() for task in [first, *rest]) == [0, 1, 2]

            waiting = asyncio.ensure_future(results.get())
            await asyncio.sleep(0)
            results.close()
            with pytest.raises(QueueClosed):
                await bounded(waiting, "a reader waiting when the queue was closed")
            with pytest.raises(QueueClosed):
                await results.get()
            with pytest.raises(QueueClosed):
                results.get_nowait()
            with pytest.raises(QueueClosed):
                results.get_sync(timeout=bound())

        run(scenario())

    def test_task_finishing_into_a_closed_queue_is_dropped(
        self, make_server: MakeServer, serve: Serve
    ) -> None:
        server = make_server()
        closed = ResultsQueue()
        closed.close()
        results = ResultsQueue()

        async def scenario() -> tuple[Task, Task]:
            async with serve(server):
                dropped = await server.submit(Task(tasks.echo, ("dropped",), results_queue=closed))
                await await_until(dropped.done, "the task to finish")
                kept = await server.submit(Task(tasks.echo, ("kept",), results_queue=results))
                await collect(results, 1)
            return dropped, kept

        dropped, kept = run(scenario())
        assert dropped.status is TaskStatus.SUCCEEDED
        assert kept.outcome() == "kept"


class TestResults(ResultsTests):
    backend = EVERY_INSTALLED_BACKEND
