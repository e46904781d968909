"""Starting, submitting and stopping: contracts C1, C2, C7 and C12."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from taskplex.conformance import _tasks as tasks
from taskplex.conformance._base import (
    EVERY_INSTALLED_BACKEND,
    BackendUnderTest,
    MakeExecutor,
    MakeServer,
    Serve,
    SuiteBase,
)
from taskplex.conformance._support import (
    Markers,
    assert_clean,
    assert_delivered_once,
    bound,
    bounded,
    bounded_call,
    collect,
    occupy_every_executor_slot,
    occupy_every_slot,
    run,
    wait_until,
)
from taskplex.conformance.provider import Leftovers
from taskplex.errors import ServerNotRunning, TaskCancelled
from taskplex.results import ResultsQueue
from taskplex.server import Capabilities
from taskplex.task import Task, TaskStatus

EXIT_SCRIPT = """
import pickle, taskplex
from taskplex.conformance import _tasks
backend = pickle.load(open({tmp!r} + "/backend.pickle", "rb"))
options = pickle.load(open({tmp!r} + "/options.pickle", "rb"))
executor = taskplex.Executor(backend, **options)
for call in {calls!r}:
    executor.submit(_tasks.touch_and_wait, *call)
{shutdown}
"""
"""A program that submits work and ends without waiting for it (C24)."""


def _raised_at_once(call: Coroutine[Any, Any, Any]) -> BaseException:
    """Step ``call`` once: it must raise before waiting for anything."""
    try:
        call.send(None)
    except StopIteration:
        pytest.fail("the call succeeded but must have failed")
    except BaseException as exc:
        return exc
    call.close()
    pytest.fail("the call waited instead of failing at once")


class LifecycleTests(SuiteBase):
    """C1, C2, C7, C12: every task ends once; submit needs a running server; stop; restart."""

    # ------------------------------------------------------------------ C1

    def test_every_task_is_delivered_exactly_once(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server(workers=2)
        results = ResultsQueue()
        submitted: list[Task] = []

        async def scenario() -> None:
            async with serve(server):
                for i in range(12):
                    function, args = (
                        (tasks.echo, (i,)) if i % 3 else (tasks.raise_failure, (f"failure {i}",))
                    )
                    submitted.append(await server.submit(Task(function, args, results_queue=results)))
                for i in range(4):
                    # the other way in: straight onto the task queue, without submit()
                    direct = Task(tasks.echo, (100 + i,), results_queue=results)
                    await server.task_queue.put(direct)
                    submitted.append(direct)
                assert_delivered_once(await collect(results, len(submitted)), submitted)
            assert len(results) == 0, "a task was delivered more than once"

        run(scenario())
        for task in submitted:
            expected = (
                TaskStatus.FAILED if task.function is tasks.raise_failure else (TaskStatus.SUCCEEDED)
            )
            assert task.status is expected, f"{task!r}: {task.exception!r}"
            assert task.finished_at is not None
        assert [t.result for t in submitted if t.status is TaskStatus.SUCCEEDED] == [
            *(i for i in range(12) if i % 3),
            100,
            101,
            102,
            103,
        ]

    # ------------------------------------------------------------------ C2

    def test_submit_before_start_fails_at_once(self, make_server: MakeServer) -> None:
        server = make_server()
        task = Task(tasks.echo, (1,))

        async def scenario() -> None:
            exc = _raised_at_once(server.submit(task))
            assert isinstance(exc, ServerNotRunning), repr(exc)
            assert "start" in str(exc), f"the error should say how to fix it: {exc}"

        run(scenario())
        assert task.status is TaskStatus.PENDING

    def test_submit_after_stop_fails_at_once(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server()
        task = Task(tasks.echo, (1,))

        async def scenario() -> None:
            async with serve(server):
                pass
            assert not server.is_running()
            exc = _raised_at_once(server.submit(task))
            assert isinstance(exc, ServerNotRunning), repr(exc)

        run(scenario())
        assert task.status is TaskStatus.PENDING

    def test_executor_submit_after_shutdown_fails(self, make_executor: MakeExecutor) -> None:
        executor = make_executor()
        bounded_call(executor.shutdown, "Executor.shutdown()")
        with pytest.raises(RuntimeError):
            bounded_call(lambda: executor.submit(tasks.echo, 1), "submit after shutdown")

    # ------------------------------------------------------------------ C7

    def test_stop_cancels_queued_and_running_tasks(
        self,
        make_server: MakeServer,
        serve: Serve,
        markers: Markers,
        leftovers: Leftovers,
        capabilities: Capabilities,
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        queued_names = [f"queued{i}" for i in range(3)]

        async def scenario() -> list[Task]:
            async with serve(server):
                blockers = await occupy_every_slot(server, markers, results)
                queued = [
                    await server.submit(markers.task(name, results_queue=results))
                    for name in queued_names
                ]
                everything = [*blockers, *queued]
                stopping = asyncio.ensure_future(server.stop())
                delivered = await collect(results, len(everything))
                if not capabilities.cancel_running:
                    # running functions cannot be stopped; stop() waits until they end
                    markers.release_blockers(blockers)
                await bounded(stopping, "server.stop() with running and queued tasks")
                assert not server.is_running()
                await bounded(server.stop(), "a second server.stop()")
                server.cancel()
                assert_delivered_once(delivered, everything)
                if capabilities.cancel_running:
                    markers.release_blockers(blockers)
                    await markers.assert_never(
                        *(f"blocker{i}" for i in range(len(blockers))), stage="done"
                    )
                await markers.assert_never(*queued_names, stage="started")
            assert len(results) == 0, "a task was delivered more than once"
            return everything

        for task in run(scenario()):
            assert task.status is TaskStatus.CANCELLED, f"{task!r}: {task.exception!r}"
            assert isinstance(task.exception, TaskCancelled), repr(task.exception)
        assert_clean(leftovers)

    def test_stop_with_wait_lets_pending_tasks_finish(
        self,
        make_server: MakeServer,
        serve: Serve,
        markers: Markers,
        leftovers: Leftovers,
    ) -> None:
        server = make_server(workers=1)
        results = ResultsQueue()
        names = ["running", "queued0", "queued1"]

        async def scenario() -> list[Task]:
            async with serve(server):
                submitted = [
                    await server.submit(markers.task(name, hold=True, results_queue=results))
                    for name in names
                ]
                await markers.until("running")
                stopping = asyncio.ensure_future(server.stop(wait=True))
                for name in names:
                    markers.release(name)
                await bounded(stopping, "server.stop(wait=True)")
                assert_delivered_once(await collect(results, len(names)), submitted)
            return submitted

        for task in run(scenario()):
            assert task.status is TaskStatus.SUCCEEDED, f"{task!r}: {task.exception!r}"
        assert all(markers.has(name, "done") for name in names)
        assert_clean(leftovers)

    def test_executor_shutdown_cancel_futures(
        self,
        make_executor: MakeExecutor,
        markers: Markers,
        leftovers: Leftovers,
    ) -> None:
        executor = make_executor(workers=1)
        blockers = occupy_every_executor_slot(executor, markers)
        queued = [executor.submit(tasks.touch_and_wait, *markers.args(f"queued{i}")) for i in range(3)]
        # a backend that launches ahead of its workers holds blockers that have not started:
        # those are pending in concurrent.futures' sense, and cancel_futures may cancel them
        running = [future for future in blockers if future.running()]
        assert running, "occupy_every_executor_slot returned with no blocker running"
        bounded_call(
            lambda: executor.shutdown(wait=False, cancel_futures=True),
            "shutdown(wait=False, cancel_futures=True)",
        )
        wait_until(lambda: all(f.cancelled() for f in queued), "the queued futures to be cancelled")
        markers.release_blockers(blockers)
        bounded_call(executor.shutdown, "a second shutdown(wait=True)")
        for i, future in enumerate(blockers):
            if future in running or not future.cancelled():
                assert future.result(timeout=0) == f"blocker{i}"
            else:
                assert not markers.has(f"blocker{i}", "started"), "a cancelled blocker ran"
        assert not any(markers.has(f"queued{i}", "started") for i in range(3))
        assert_clean(leftovers)

    def test_executor_shutdown_waits_for_queued_tasks(
        self,
        make_executor: MakeExecutor,
        markers: Markers,
        leftovers: Leftovers,
    ) -> None:
        executor = make_executor(workers=2)
        futures = [executor.submit(tasks.touch_and_wait, *markers.args(f"task{i}")) for i in range(6)]
        bounded_call(executor.shutdown, "Executor.shutdown()")
        assert [f.result(timeout=0) for f in futures] == [f"task{i}" for i in range(6)]
        assert_clean(leftovers)

    # ------------------------------------------------------------------ C24

    @pytest.mark.parametrize("ending", ["no shutdown", "shutdown(wait=False)"])
    def test_work_completes_when_the_program_exits(
        self,
        taskplex_backend: BackendUnderTest,
        server_options: dict[str, Any],
        markers: Markers,
        tmp_path: Path,
        ending: str,
    ) -> None:
        options = {**server_options, "workers": 2}
        (tmp_path / "options.pickle").write_bytes(pickle.dumps(options))
        # by name where it is installed, else the class itself (importable by its module)
        backend = (
            taskplex_backend.name if isinstance(self.backend, str) else taskplex_backend.server_class
        )
        (tmp_path / "backend.pickle").write_bytes(pickle.dumps(backend))
        names = [f"exit{i}" for i in range(6)]
        script = EXIT_SCRIPT.format(
            tmp=str(tmp_path),
            calls=[markers.args(name) for name in names],
            shutdown="executor.shutdown(wait=False)" if ending != "no shutdown" else "pass",
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=2 * bound(),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        done = [name for name in names if markers.has(name, "done")]
        assert done == names, (
            f"after the program exited ({ending}), only {done} of the submitted tasks had run"
        )
        assert result.stderr == "", f"the program printed at exit:\n{result.stderr}"

    # ------------------------------------------------------------------ C12

    def test_starting_a_running_server_fails(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server()
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                task_group = server.task_group
                assert task_group is not None
                with pytest.raises(RuntimeError):
                    await bounded(server.start(task_group), "a second start()")
                assert server.is_running()
                task = await server.submit(Task(tasks.echo, ("after",), results_queue=results))
                await collect(results, 1)
            return task

        task = run(scenario())
        assert task.status is TaskStatus.SUCCEEDED
        assert task.result == "after"

    def test_stopped_server_starts_again(self, make_server: MakeServer, serve: Serve) -> None:
        server = make_server(workers=2)

        async def one_round(value: int) -> Any:
            results = ResultsQueue()
            async with serve(server):
                assert server.is_running()
                await server.submit(Task(tasks.echo, (value,), results_queue=results))
                (task,) = await collect(results, 1)
            assert not server.is_running()
            return task.outcome()

        async def two_rounds() -> list[Any]:
            return [await one_round(1), await one_round(2)]

        assert run(two_rounds()) == [1, 2]
        # and in another event loop, as a second asyncio.run() of the same program would
        assert run(one_round(3)) == 3


class TestLifecycle(LifecycleTests):
    backend = EVERY_INSTALLED_BACKEND
