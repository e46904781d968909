"""Capacity and order: contracts C8 (workers), C9 (queue_size), C10 (order) and C13 (submitting
from inside a task)."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest

from taskplex.conformance import _tasks as tasks
from taskplex.conformance import requirements
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
    assert_delivered_once,
    await_until,
    bound,
    bounded,
    bounded_call,
    collect,
    grace,
    highest_seen,
    occupy_every_executor_slot,
    occupy_every_slot,
    run,
    wait_until,
)
from taskplex.conformance.requirements import requires
from taskplex.errors import SerializationError, TaskplexError
from taskplex.results import ResultsQueue
from taskplex.server import Capabilities
from taskplex.task import Task, TaskStatus

LARGE_POOL = 33
"""More workers than any default pool has (the standard library's thread pool caps at 32)."""


class ConcurrencyTests(SuiteBase):
    """C8, C9, C10, C13: as many tasks at once as workers, back-pressure, order, re-entrance."""

    # ------------------------------------------------------------------ C8

    def test_peak_concurrency_equals_workers(
        self, make_executor: MakeExecutor, markers: Markers
    ) -> None:
        workers = 3
        executor = make_executor(workers=workers)
        futures = [
            executor.submit(tasks.occupy_slot, str(markers.directory), f"slot{i}")
            for i in range(3 * workers)
        ]
        wait_until(
            lambda: markers.slots_held() >= workers,
            f"{workers} tasks to run at once (workers={workers})",
        )
        held = highest_seen(markers.slots_held)
        assert held <= workers, f"{held} tasks ran at once with workers={workers}"
        markers.open_slots()
        peaks = [future.result(timeout=bound()) for future in futures]
        assert max(peaks) == workers, f"tasks saw {max(peaks)} running at once, not {workers}"

    def test_more_workers_than_any_default_pool(
        self, make_executor: MakeExecutor, markers: Markers, taskplex_backend: BackendUnderTest
    ) -> None:
        workers = min(LARGE_POOL, taskplex_backend.provider.max_workers or LARGE_POOL)
        executor = make_executor(workers=workers)
        futures = [
            executor.submit(tasks.occupy_slot, str(markers.directory), f"slot{i}")
            for i in range(workers + 5)
        ]
        wait_until(lambda: markers.slots_held() >= workers, f"{workers} tasks to run at once")
        held = highest_seen(markers.slots_held)
        assert held == workers, f"{held} tasks ran at once with workers={workers}"
        markers.open_slots()
        assert max(future.result(timeout=bound()) for future in futures) == workers

    @pytest.mark.parametrize("how", ["timeout", "cancel"], ids=["timed_out", "cancelled"])
    def test_peak_concurrency_holds_after_timeouts_and_cancels(
        self,
        make_server: MakeServer,
        serve: Serve,
        markers: Markers,
        capabilities: Capabilities,
        how: str,
    ) -> None:
        workers = 2
        server = make_server(workers=workers)
        results = ResultsQueue()
        directory = str(markers.directory)
        timeout = 0.5 if how == "timeout" else None
        stops_work = capabilities.timeout_kills_work if how == "timeout" else capabilities.cancel_running

        async def scenario() -> list[Task]:
            async with serve(server):
                first = [
                    await server.submit(
                        Task(
                            tasks.occupy_slot,
                            (directory, f"first{i}"),
                            timeout=timeout,
                            results_queue=results,
                        )
                    )
                    for i in range(workers)
                ]
                await await_until(lambda: markers.slots_held() >= workers, "the first tasks to run")
                if how == "cancel":
                    for task in first:
                        assert task.cancel() is stops_work
                if how == "timeout" or stops_work:
                    await await_until(lambda: all(task.done() for task in first), "the first to end")
                if stops_work:
                    markers.clear_slots("first")  # killed work never removes its own slot files
                # work that could not be stopped still holds its slot: nothing new may join it
                second = [
                    await server.submit(
                        Task(tasks.occupy_slot, (directory, f"second{i}"), results_queue=results)
                    )
                    for i in range(workers)
                ]
                held = await asyncio.to_thread(highest_seen, markers.slots_held)
                assert held <= workers, (
                    f"{held} tasks ran at once with workers={workers}, after {how}s of running tasks"
                )
                markers.open_slots()
                await collect(results, 2 * workers)
            return second

        for task in run(scenario()):
            assert task.status is TaskStatus.SUCCEEDED, repr(task.exception)
            assert task.result <= workers, f"a task saw {task.result} tasks running at once"

    @requires("honours_cores")
    def test_a_multi_core_task_takes_its_cores_in_slots(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        workers = 3
        server = make_server(workers=workers)
        results = ResultsQueue()
        directory = str(markers.directory)
        shapes = [2, 1, 1, 2, 1, 3, 1]

        async def scenario() -> list[Task]:
            async with serve(server):
                submitted = [
                    await server.submit(
                        Task(
                            tasks.occupy_slot,
                            (directory, f"t{i}", cores),
                            resources={"cores": cores},
                            results_queue=results,
                        )
                    )
                    for i, cores in enumerate(shapes)
                ]
                await await_until(lambda: markers.slots_held() >= 2, "the first tasks to run")
                held = await asyncio.to_thread(highest_seen, markers.slots_held)
                assert held <= workers, f"{held} cores in use at once with workers={workers}"
                markers.open_slots()
                assert_delivered_once(await collect(results, len(shapes)), submitted)
            return submitted

        for task in run(scenario()):
            assert task.status is TaskStatus.SUCCEEDED, repr(task.exception)
            assert task.result <= workers, f"a task saw {task.result} cores in use at once"

    # ------------------------------------------------------------------ C9

    def test_full_task_queue_makes_submit_wait(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=1, queue_size=2)
        results = ResultsQueue()

        async def scenario() -> None:
            async with serve(server):
                blockers = await occupy_every_slot(server, markers, results)
                queued = [
                    await bounded(
                        server.submit(markers.task(f"queued{i}", results_queue=results)),
                        "submit to a task queue with room",
                    )
                    for i in range(2)
                ]
                last = markers.task("last", results_queue=results)
                submitting = asyncio.ensure_future(server.submit(last))
                done, _ = await asyncio.wait({submitting}, timeout=grace())
                assert not done, "submit returned although the task queue was full (queue_size=2)"
                markers.release_blockers(blockers)
                await bounded(submitting, "submit once the task queue had room")
                everything = [*blockers, *queued, last]
                assert_delivered_once(await collect(results, len(everything)), everything)

        run(scenario())

    def test_executor_submit_blocks_while_the_queue_is_full(
        self, make_executor: MakeExecutor, markers: Markers
    ) -> None:
        executor = make_executor(workers=1, queue_size=2)
        blockers = occupy_every_executor_slot(executor, markers)
        queued = [
            bounded_call(
                functools.partial(executor.submit, tasks.touch_and_wait, *markers.args(f"queued{i}")),
                "submit to a task queue with room",
            )
            for i in range(2)
        ]
        last: list[Any] = []
        submitter = threading.Thread(
            target=lambda: last.append(executor.submit(tasks.touch_and_wait, *markers.args("last"))),
            daemon=True,
        )
        submitter.start()
        submitter.join(grace())
        assert submitter.is_alive(), "submit returned although the task queue was full"
        markers.release_blockers(blockers)
        submitter.join(bound())
        assert not submitter.is_alive(), f"submit still blocked {bound()} s after room was made"
        outcomes = [f.result(timeout=bound()) for f in [*blockers, *queued, *last]]
        assert outcomes == [*(f"blocker{i}" for i in range(len(blockers))), "queued0", "queued1", "last"]

    def test_results_are_delivered_while_nobody_reads_them(
        self, make_server: MakeServer, serve: Serve
    ) -> None:
        server = make_server(workers=2, queue_size=2)
        results = ResultsQueue()

        async def scenario() -> None:
            async with serve(server):
                submitted = [
                    await bounded(
                        server.submit(Task(tasks.echo, (i,), results_queue=results)),
                        "submit while earlier results sit unread",
                    )
                    for i in range(30)
                ]
                await await_until(
                    lambda: all(task.done() for task in submitted), "all 30 tasks to finish"
                )
                assert len(results) == 30
                assert_delivered_once(await collect(results, 30), submitted)

        run(scenario())

    # ------------------------------------------------------------------ C10

    def test_results_arrive_in_completion_order(
        self, make_server: MakeServer, serve: Serve, markers: Markers
    ) -> None:
        server = make_server(workers=3)
        results = ResultsQueue()

        async def scenario() -> None:
            async with serve(server):
                submitted = {
                    name: await server.submit(markers.task(name, hold=True, results_queue=results))
                    for name in ("first", "second", "third")
                }
                for name in submitted:
                    await markers.until(name)
                for name in ("third", "first", "second"):
                    markers.release(name)
                    (delivered,) = await collect(results, 1)
                    assert delivered.id == submitted[name].id, (
                        f"released {name!r} (task {submitted[name].id}) but task "
                        f"{delivered.id} was delivered"
                    )
                    assert delivered.outcome() == name

        run(scenario())

    def test_executor_map_returns_submission_order(
        self, make_executor: MakeExecutor, markers: Markers
    ) -> None:
        executor = make_executor(workers=3)
        names = ["m0", "m1", "m2"]
        outcomes = executor.map(
            tasks.touch_and_wait,
            [str(markers.directory)] * 3,
            names,
            [True] * 3,
            timeout=bound(),
        )
        for name in reversed(names):
            markers.wait(name)
            markers.release(name)
            markers.wait(name, "done")
        assert list(outcomes) == names

    # ------------------------------------------------------------------ C13

    @pytest.mark.parametrize("workers", [1, 2])
    def test_executor_submit_from_inside_a_task(
        self, make_executor: MakeExecutor, capabilities: Capabilities, workers: int
    ) -> None:
        executor = make_executor(workers=workers)
        refused: SerializationError | None = None
        try:
            future = bounded_call(
                lambda: executor.submit(tasks.submit_from_task, executor, 7),
                "submitting a task that holds the executor",
            )
        except SerializationError as exc:
            refused = exc
        if refused is not None:
            assert requirements.declares(capabilities, "pickles_tasks"), (
                "an in-process backend refused a task because its argument cannot be pickled"
            )
            assert "Executor" in str(refused), f"the error should say what cannot be sent: {refused}"
            return  # failing at once is allowed
        try:
            error = future.exception(timeout=bound())
        except TimeoutError:
            pytest.fail(
                f"a task submitting to its own executor (workers={workers}) did not finish within "
                f"{bound()} s: waiting inside a task must not deadlock"
            )
        if error is None:
            assert future.result() == 7
        else:
            assert isinstance(error, TaskplexError | RuntimeError), (
                f"submitting from inside a task must work or fail at once, got {error!r}"
            )

    @requires("runs_coroutines")
    @pytest.mark.parametrize("workers", [1, 2])
    def test_submit_from_a_coroutine_task(
        self, make_server: MakeServer, serve: Serve, workers: int
    ) -> None:
        server = make_server(workers=workers)
        results = ResultsQueue()

        async def scenario() -> Task:
            async with serve(server):
                outer = await server.submit(
                    Task(tasks.submit_from_coroutine, (server, 11), results_queue=results)
                )
                await collect(results, 1)
            return outer

        outer = run(scenario())
        assert outer.status is TaskStatus.SUCCEEDED, repr(outer.exception)
        assert outer.result == 11

    @requires("runs_coroutines")
    @pytest.mark.parametrize("queue_size", [0, 2])
    def test_executor_submit_from_a_coroutine_on_its_loop(
        self, make_executor: MakeExecutor, queue_size: int
    ) -> None:
        executor = make_executor(workers=2, queue_size=queue_size)
        future = executor.submit(tasks.submit_to_executor_from_loop, executor, 5)
        assert future.result(timeout=bound()) == 5

    @requires("runs_coroutines")
    def test_coroutine_functions_are_awaited(self, make_executor: MakeExecutor) -> None:
        executor = make_executor()
        assert executor.submit(tasks.echo_coroutine, "awaited").result(timeout=bound()) == ("awaited")


class TestConcurrency(ConcurrencyTests):
    backend = EVERY_INSTALLED_BACKEND
