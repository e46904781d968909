"""The backend contract from the server's side: what happens when a backend fails or misbehaves,
attempt states, withdrawing, and the races between a cancel in one thread and the server in another.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import pytest

from taskplex import (
    BackendError,
    Executor,
    ResultsQueue,
    Task,
    TaskCancelled,
    TaskServer,
    TaskStatus,
)
from taskplex.backend import Attempt, Backend, BackendContext, CoroutineBackend

BOUND = 30.0


class Calls(CoroutineBackend):
    """Runs each attempt's function on the loop (awaiting a coroutine)."""

    async def execute(self, attempt: Attempt) -> Any:
        task = attempt.task
        value = task.function(*task.args, **task.kwargs)
        return await value if asyncio.iscoroutine(value) else value


class Held(Backend):
    """Launches attempts and leaves their reports to the test."""

    def __init__(self) -> None:
        self.launched: list[Attempt] = []
        self.aborted: list[Attempt] = []

    def launch(self, attempts: Sequence[Attempt]) -> None:
        self.launched.extend(attempts)

    def abort(self, attempt: Attempt) -> None:
        self.aborted.append(attempt)
        attempt.give_back()


async def until(condition: Any) -> None:
    for _ in range(int(BOUND * 1000)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached in time")


def run_in_group(scenario: Any) -> Any:
    """Run ``scenario(task_group)`` inside a TaskGroup alongside one task of the caller's own."""
    caller_task_cancelled: list[bool] = []

    async def callers_own_work() -> None:
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            caller_task_cancelled.append(True)
            raise

    async def main() -> Any:
        async with asyncio.TaskGroup() as task_group:
            own = task_group.create_task(callers_own_work())
            result = await asyncio.wait_for(scenario(task_group), BOUND)
            assert not caller_task_cancelled, "the server cancelled the caller's own task"
            own.cancel()
        return result

    return asyncio.run(main())


# ------------------------------------------------------------------------------ failing backends


class PrepareFails(Calls):
    def prepare(self, task: Task) -> Any:
        if task.name == "bad":
            raise RuntimeError("cannot prepare this one")
        return None


def test_an_unexpected_error_in_prepare_fails_only_that_task() -> None:
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> tuple[Task, Task]:
        server = TaskServer(PrepareFails())
        await server.start(task_group)
        with pytest.raises(BackendError, match=r"prepare.*cannot prepare this one"):
            await server.submit(Task(abs, (-1,), name="bad"))
        put_directly = Task(abs, (-2,), name="bad", results_queue=results)
        await server.task_queue.put(put_directly)
        good = await server.submit(Task(abs, (-3,), results_queue=results))
        await asyncio.wait_for(results.get_batch(2), BOUND)
        assert server.is_running()
        await server.stop()
        return put_directly, good

    put_directly, good = run_in_group(scenario)
    assert put_directly.status is TaskStatus.FAILED
    assert isinstance(put_directly.exception, BackendError)
    assert good.result == 3


class LaunchFails(Calls):
    def launch(self, attempts: Sequence[Attempt]) -> None:
        if any(attempt.task.name == "bad" for attempt in attempts):
            raise RuntimeError("the scheduler refused the job")
        super().launch(attempts)


def test_an_unexpected_error_in_launch_fails_those_tasks_with_the_cause() -> None:
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> tuple[Task, Task]:
        server = TaskServer(LaunchFails())
        await server.start(task_group)
        bad = await server.submit(Task(abs, (-1,), name="bad", results_queue=results))
        await asyncio.wait_for(results.get(), BOUND)
        good = await server.submit(Task(abs, (-2,), results_queue=results))
        await asyncio.wait_for(results.get(), BOUND)
        await server.stop()
        return bad, good

    bad, good = run_in_group(scenario)
    assert bad.status is TaskStatus.FAILED
    assert isinstance(bad.exception, BackendError)
    assert "refused the job" in str(bad.exception)
    assert isinstance(bad.exception.__cause__, RuntimeError)
    assert good.result == 2


class StopFails(Calls):
    async def stop(self) -> None:
        raise OSError("could not delete the jobs")


def test_an_error_in_the_backends_stop_is_reported_and_the_stop_completes() -> None:
    async def scenario(task_group: asyncio.TaskGroup) -> TaskServer:
        server = TaskServer(StopFails())
        await server.start(task_group)
        results = ResultsQueue()
        await server.submit(Task(abs, (-1,), results_queue=results))
        await asyncio.wait_for(results.get(), BOUND)
        await asyncio.wait_for(server.stop(), BOUND)
        assert not server.is_running()
        return server

    server = run_in_group(scenario)
    assert isinstance(server.failure, BackendError)
    assert "could not delete the jobs" in str(server.failure)


class LoopFails(Held):
    async def start(self, context: BackendContext) -> None:
        self.context = context
        self.crash = asyncio.Event()
        context.spawn(self.poll(), name="poll the scheduler")

    async def poll(self) -> None:
        await self.crash.wait()
        raise ConnectionError("squeue: connection refused")


def test_a_failing_background_loop_fails_the_tasks_and_stops_the_server_cleanly() -> None:
    results = ResultsQueue()
    backend = LoopFails()

    async def scenario(task_group: asyncio.TaskGroup) -> tuple[TaskServer, list[Task]]:
        server = TaskServer(backend, workers=1)
        await server.start(task_group)
        submitted = [await server.submit(Task(abs, (-i,), results_queue=results)) for i in range(3)]
        await until(lambda: len(backend.launched) == 1)
        backend.crash.set()
        await asyncio.wait_for(results.get_batch(3), BOUND)
        await asyncio.wait_for(server.stop(), BOUND)
        return server, submitted

    server, submitted = run_in_group(scenario)
    assert not server.is_running()
    assert "poll the scheduler" in str(server.failure)
    for task in submitted:
        assert task.status is TaskStatus.FAILED
        assert isinstance(task.exception, BackendError)
        assert isinstance(task.exception.__cause__, ConnectionError)


def test_run_blocking_is_bounded() -> None:
    async def scenario(task_group: asyncio.TaskGroup) -> None:
        backend = Held()
        server = TaskServer(backend)
        context = BackendContext(server)
        await server.start(task_group)
        release = threading.Event()
        with pytest.raises(BackendError, match=r"did not return within 0\.05 s"):
            await context.run_blocking(release.wait, 5, timeout=0.05)
        release.set()
        assert await context.run_blocking(sum, [1, 2], timeout=BOUND) == 3
        await server.stop()

    run_in_group(scenario)


# ------------------------------------------------------------------------------ attempt states


def test_a_launched_attempt_is_not_running_until_the_backend_says_it_started() -> None:
    backend = Held()
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> Task:
        server = TaskServer(backend)
        await server.start(task_group)
        task = await server.submit(Task(abs, (-5,), timeout=0.05, results_queue=results))
        await until(lambda: len(backend.launched) == 1)
        assert task.status is TaskStatus.QUEUED
        assert task.launched_at is not None
        assert task.started_at is None
        await asyncio.sleep(0.1)
        assert not task.done(), "the timeout counts from the start, not from the launch"
        assert backend.launched[0].started() is True
        assert task.status is TaskStatus.RUNNING
        assert task.attempts == 1
        await asyncio.wait_for(results.get(), BOUND)
        await server.stop()
        return task

    task = run_in_group(scenario)
    assert task.status is TaskStatus.FAILED, "it timed out once started"


def test_cancelling_a_launched_attempt_withdraws_it() -> None:
    backend = Held()
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> tuple[Task, Attempt]:
        server = TaskServer(backend)
        await server.start(task_group)
        task = await server.submit(Task(abs, (-5,), results_queue=results))
        await until(lambda: len(backend.launched) == 1)
        attempt = backend.launched[0]
        assert await asyncio.to_thread(task.cancel) is True
        assert attempt.started() is False, "a withdrawn attempt must not start"
        assert (await asyncio.wait_for(results.get(), BOUND)) is task
        await server.stop()
        return task, attempt

    task, attempt = run_in_group(scenario)
    assert task.cancelled()
    assert backend.aborted == [attempt]
    assert task.attempts == 0


def claim_scenario(steps: Any) -> tuple[Task, Held]:
    """Submit ``abs(-5)`` to a server on a Held backend, then ``await steps(server, task, attempt)``
    once it is launched, and wait for its delivery."""
    backend = Held()
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> Task:
        server = TaskServer(backend)
        await server.start(task_group)
        task = await server.submit(Task(abs, (-5,), results_queue=results))
        await until(lambda: len(backend.launched) == 1)
        await steps(server, task, backend.launched[0])
        assert (await asyncio.wait_for(results.get(), BOUND)) is task
        await server.stop()
        return task

    return run_in_group(scenario), backend


def test_a_claimed_attempt_can_no_longer_be_withdrawn_and_runs_when_it_starts() -> None:
    async def steps(server: TaskServer, task: Task, attempt: Attempt) -> None:
        assert attempt.claim() is True
        assert attempt.claim() is True, "claiming again changes nothing"
        cancelled = await asyncio.to_thread(server.cancel_task, task, running=False)
        assert cancelled is False, "Future.cancel() of a claimed attempt must say it cannot"
        assert task.status is TaskStatus.QUEUED, "claimed is not running"
        assert task.started_at is None
        assert attempt.started() is True
        assert task.status is TaskStatus.RUNNING
        attempt.succeeded(5)

    task, backend = claim_scenario(steps)
    assert task.result == 5
    assert task.attempts == 1
    assert backend.aborted == []


def test_a_withdrawn_attempt_cannot_be_claimed() -> None:
    async def steps(server: TaskServer, task: Task, attempt: Attempt) -> None:
        assert await asyncio.to_thread(server.cancel_task, task, running=False) is True
        assert attempt.claim() is False, "a withdrawn attempt must not start"
        assert attempt.started() is False

    task, _ = claim_scenario(steps)
    assert task.cancelled()
    assert task.attempts == 0


def test_a_claimed_attempt_that_ends_without_a_start_report_counts_as_run() -> None:
    async def steps(server: TaskServer, task: Task, attempt: Attempt) -> None:
        assert attempt.claim() is True
        attempt.succeeded(5)  # its start report was lost, or never sent
        await until(task.done)
        assert attempt.started() is False, "over: it cannot start again"

    task, _ = claim_scenario(steps)
    assert task.result == 5
    assert task.attempts == 1


def test_a_given_back_attempt_runs_again_without_counting() -> None:
    backend = Held()
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> Task:
        server = TaskServer(backend)
        await server.start(task_group)
        task = await server.submit(Task(abs, (-5,), results_queue=results))
        await until(lambda: len(backend.launched) == 1)
        backend.launched[0].give_back()
        await until(lambda: len(backend.launched) == 2)
        second = backend.launched[1]
        assert second.number == 1
        second.started()
        second.succeeded(5)
        await asyncio.wait_for(results.get(), BOUND)
        await server.stop()
        return task

    task = run_in_group(scenario)
    assert task.result == 5
    assert task.attempts == 1


def test_reports_from_another_thread_are_safe() -> None:
    class Threaded(Held):
        def launch(self, attempts: Sequence[Attempt]) -> None:
            for attempt in attempts:
                threading.Thread(target=self.run, args=(attempt,)).start()

        def run(self, attempt: Attempt) -> None:
            if attempt.started():
                attempt.succeeded(attempt.task.args[0] * 2)
                attempt.succeeded("a duplicate report is ignored")

    with Executor(TaskServer(Threaded(), workers=4)) as executor:
        assert list(executor.map(int, range(50))) == [2 * n for n in range(50)]


# ------------------------------------------------------------------------------ races


def test_a_task_cancelled_while_it_is_being_submitted_is_delivered_once() -> None:
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> Task:
        server = TaskServer(Calls())
        await server.start(task_group)
        task = Task(abs, (-1,), results_queue=results)
        server.accept(task)  # accepted in one thread ...
        assert await asyncio.to_thread(task.cancel) is True  # ... cancelled from another ...
        await asyncio.sleep(0.01)
        server.enqueue_accepted([task])  # ... before the server took it in
        assert (await asyncio.wait_for(results.get(), BOUND)) is task
        await asyncio.wait_for(server.stop(wait=True), BOUND)
        assert len(results) == 0
        return task

    task = run_in_group(scenario)
    assert task.cancelled()


def test_cancels_racing_submits_never_wedge_the_executor() -> None:
    gate = threading.Event()
    futures: list[Any] = []
    with Executor("async", workers=2) as executor:

        def cancel_everything() -> None:
            while not gate.is_set():
                for future in list(futures):
                    future.task.cancel()

        canceller = threading.Thread(target=cancel_everything)
        canceller.start()
        try:
            futures.extend(executor.submit(abs, -n) for n in range(2000))
        finally:
            gate.set()
            canceller.join()
    # shutdown(wait=True) returned: nothing stayed pending
    for future in futures:
        assert future.done()
        assert future.cancelled() or future.result() >= 0


# ------------------------------------------------------------------------------ memory


def test_a_named_task_is_not_kept_after_it_was_delivered() -> None:
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> weakref.ref[Task]:
        server = TaskServer(Calls())
        await server.start(task_group)
        task = Task(abs, (-1,), name="kept-only-by-the-caller", results_queue=results)
        await server.submit(task)
        await asyncio.wait_for(results.get(), BOUND)
        ref = weakref.ref(task)
        del task
        assert ref() is None, "the server keeps a finished task alive"
        await server.stop()
        return ref

    run_in_group(scenario)


def test_a_finished_executor_task_is_freed_without_the_cycle_collector() -> None:
    gc.disable()
    try:
        with Executor("async") as executor:
            future = executor.submit(abs, -3)
            assert future.result(timeout=BOUND) == 3
            ref = weakref.ref(future.task)
            del future
            assert ref() is None, "a finished task and its future form a reference cycle"
    finally:
        gc.enable()


def test_withdrawn_attempt_cancels_its_dependents() -> None:
    backend = Held()
    results = ResultsQueue()

    async def scenario(task_group: asyncio.TaskGroup) -> Task:
        server = TaskServer(backend)
        await server.start(task_group)
        first = await server.submit(Task(abs, (-1,), results_queue=results))
        second = await server.submit(Task(abs, (-2,), depends_on=[first], results_queue=results))
        await until(lambda: len(backend.launched) == 1)
        first.cancel()
        await asyncio.wait_for(results.get_batch(2), BOUND)
        await server.stop()
        return second

    second = run_in_group(scenario)
    assert second.cancelled()
    assert isinstance(second.exception, TaskCancelled)


class AbortFails(Held):
    def abort(self, attempt: Attempt) -> None:
        raise RuntimeError("lost track of it")


def test_a_backend_whose_abort_fails_cannot_hang_the_stop() -> None:
    backend = AbortFails()

    async def scenario(task_group: asyncio.TaskGroup) -> Task:
        server = TaskServer(backend)
        await server.start(task_group)
        task = await server.submit(Task(abs, (-1,)))
        await until(lambda: len(backend.launched) == 1)
        backend.launched[0].started()
        await asyncio.wait_for(server.stop(), BOUND)
        return task

    task = run_in_group(scenario)
    assert task.cancelled()
