"""Getting results back: contract C20 (results stay retrievable until close)."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
    await_until,
    bound,
    bounded,
    bounded_call,
    collect,
    run,
)
from taskplex.errors import QueueClosed
from taskplex.executor import Executor
from taskplex.results import ResultsQueue
from taskplex.task import Task, TaskStatus


class ResultsTests(SuiteBase):
    """C20: finished tasks can be read after the server stopped, and not after close().

    C18: a re-run with the same journal runs only what did not finish.
    """

    def test_a_rerun_with_the_journal_runs_only_what_is_left(
        self, make_server: MakeServer, markers: Markers, tmp_path: Path
    ) -> None:
        journal = tmp_path / "run.db"  # the journal lives where the client runs
        folder = str(markers.directory)
        first = bounded_call(lambda: Executor(make_server(workers=2), journal=journal), "start")
        try:
            done = [first.submit(tasks.count_run, folder, f"j{i}") for i in range(5)]
            failed = first.submit(tasks.fail_until, folder, "jf", 3)
            assert [f.result(timeout=bound()) for f in done] == [f"j{i}" for i in range(5)]
            with pytest.raises(tasks.TaskFailure):
                failed.result(timeout=bound())
        finally:
            bounded_call(first.shutdown, "Executor.shutdown()")
        second = bounded_call(lambda: Executor(make_server(workers=2), journal=journal), "start")
        try:
            again = [second.submit(tasks.count_run, folder, f"j{i}") for i in range(7)]
            retried = second.submit(tasks.fail_until, folder, "jf", 2)
            assert [f.result(timeout=bound()) for f in again] == [f"j{i}" for i in range(7)]
            assert retried.result(timeout=bound()) == 2, "a failed task is run again by default"
        finally:
            bounded_call(second.shutdown, "Executor.shutdown()")
        runs = {f"j{i}": markers.runs(f"j{i}") for i in range(7)}
        assert runs == dict.fromkeys(runs, 1), (
            f"runs per task over two runs with one journal (j5, j6 new in the second): {runs}"
        )

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
