"""Task objects in ropt's protocol on a server's task queue, and things that are not tasks at all.

taskplex_ropt's Task and ResultsQueue are drop-in copies of ropt's; any object in that protocol
is taken the same way (core knows nothing of taskplex_ropt).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from taskplex import Task
from taskplex_async import AsyncServer
from taskplex_ropt import ResultsQueue
from taskplex_ropt import Task as RoptTask

BOUND = 30.0


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


async def _serve(server: AsyncServer, items: list[Any], *, before_start: bool = False) -> None:
    async with asyncio.TaskGroup() as group:
        if before_start:
            for item in items:
                server.task_queue.put_nowait(item)
        await server.start(group)
        if not before_start:
            for item in items:
                await server.task_queue.put(item)
        await asyncio.wait_for(server.join(), BOUND)
        await server.stop()


def test_a_foreign_task_gets_its_result_through_put_result() -> None:
    results = ResultsQueue()
    tasks = [RoptTask(function=pow, args=(2, x), results_queue=results) for x in range(3)]
    asyncio.run(_serve(AsyncServer(workers=2), tasks))
    assert sorted(results.get(timeout=BOUND).result for _ in range(3)) == [1, 2, 4]


def test_a_failing_foreign_task_is_told_and_the_group_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    results = ResultsQueue()
    good = RoptTask(function=abs, args=(-3,), results_queue=ResultsQueue())
    bad = RoptTask(function=fail, args=(7,), results_queue=results)
    with caplog.at_level(logging.ERROR, logger="taskplex.scheduler"):
        asyncio.run(_serve(AsyncServer(workers=1), [bad, good]))
    assert results.get(timeout=BOUND) is None
    assert results.closed
    assert isinstance(bad.exception, ValueError)  # type: ignore[attr-defined]
    assert good.results_queue.get(timeout=BOUND).result == 3
    assert "bad 7" in caplog.text


def test_something_that_is_not_a_task_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    results = ResultsQueue()
    after = RoptTask(function=abs, args=(-1,), results_queue=results)
    with caplog.at_level(logging.ERROR, logger="taskplex.scheduler"):
        asyncio.run(_serve(AsyncServer(workers=1), ["not a task", 42, after]))
    assert results.get(timeout=BOUND).result == 1
    assert "'not a task' was put on the task queue" in caplog.text
    assert "42 was put on the task queue" in caplog.text


def test_invalid_arguments_fail_only_that_foreign_task() -> None:
    broken = RoptTask(function=abs, args=5, results_queue=ResultsQueue())  # type: ignore[arg-type]
    fine = RoptTask(function=abs, args=(-2,), results_queue=ResultsQueue())
    asyncio.run(_serve(AsyncServer(workers=1), [broken, fine]))
    assert broken.results_queue.get(timeout=BOUND) is None
    assert "args must be a tuple" in str(broken.exception)  # type: ignore[attr-defined]
    assert fine.results_queue.get(timeout=BOUND).result == 2


def test_tasks_put_before_start_run_and_the_queue_object_is_kept() -> None:
    server = AsyncServer(workers=1)
    queue_before = server.task_queue
    results = ResultsQueue()
    both = [
        RoptTask(function=abs, args=(-5,), results_queue=results),
        Task(abs, (-6,)),
    ]
    asyncio.run(_serve(server, both, before_start=True))
    assert server.task_queue is queue_before, "a wrapped task_queue.put would be bypassed"
    assert results.get(timeout=BOUND).result == 5
    assert both[1].result == 6
    # a second run in a new event loop still works (the queue is replaced once bound)
    again = ResultsQueue()
    asyncio.run(_serve(server, [RoptTask(function=abs, args=(-8,), results_queue=again)]))
    assert again.get(timeout=BOUND).result == 8
