"""The async backend against plain ``asyncio.gather``, and what implemented task hooks cost.

Coroutine tasks do no work here, so what is measured is the bookkeeping of a task (status, record,
results queue, hooks) against the least an event loop can do to run the same coroutines.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import taskplex
from _tasks import async_noop
from harness import Candidate, Config, NotInstalled, run_interleaved
from report import Section, Target, throughput_rows
from taskplex import ResultsQueue, Task
from taskplex.plugins import pm

# A coroutine server's workers bound how many tasks run at once; gather bounds nothing, so the
# servers get room enough that the bound is not what is measured.
WORKERS = 100
GATHER = "asyncio.gather"
SERVER = "AsyncServer: await submit(Task) + ResultsQueue.get_batch"
EXECUTOR = 'Executor("async"): submit + result'
NO_PLUGIN = "AsyncServer, no plugin"
WITH_PLUGIN = "AsyncServer, no-op plugin on every task hook"


# ------------------------------------------------------------------ measured in a fresh process


def gather(n: int) -> float:
    """Seconds to gather ``n`` no-op coroutines."""

    async def timed() -> float:
        await asyncio.gather(*(async_noop(i) for i in range(min(n, 500))))
        start = time.perf_counter()
        results = await asyncio.gather(*(async_noop(i) for i in range(n)))
        elapsed = time.perf_counter() - start
        _check_sum(results, n)
        return elapsed

    return asyncio.run(timed())


def server(n: int, workers: int, plugin: bool) -> float:
    """Seconds to submit ``n`` no-op coroutine tasks to an AsyncServer and read them all back."""
    try:
        from taskplex_async import AsyncServer
    except ImportError as exc:
        raise NotInstalled(f"taskplex-backend-async: {exc}") from exc
    hooks = _NoopTaskHooks() if plugin else None
    if hooks is not None:
        pm.register(hooks, name="benchmark-noop-task-hooks")
    try:
        return asyncio.run(_through_server(AsyncServer(workers=workers), n))
    finally:
        if hooks is not None:
            pm.unregister(hooks)


async def _through_server(server: taskplex.TaskServer, n: int) -> float:
    results = ResultsQueue()
    async with asyncio.TaskGroup() as task_group:
        await server.start(task_group)
        warm_up = min(n, 500)
        for i in range(warm_up):
            await server.submit(Task(async_noop, (i,), results_queue=results))
        await results.get_batch(warm_up)
        start = time.perf_counter()
        for i in range(n):
            await server.submit(Task(async_noop, (i,), results_queue=results))
        finished = await results.get_batch(n)
        elapsed = time.perf_counter() - start
        await server.stop()
    _check_sum([task.outcome() for task in finished], n)
    return elapsed


def executor(n: int, workers: int) -> float:
    """Seconds to submit ``n`` no-op coroutines to ``Executor("async")`` and wait for each result."""
    try:
        pool = taskplex.Executor("async", workers=workers)
    except taskplex.UnknownBackend as exc:
        raise NotInstalled(str(exc)) from exc
    with pool:
        warm_up = min(n, 500)
        _check_sum(
            [future.result() for future in [pool.submit(async_noop, i) for i in range(warm_up)]], warm_up
        )
        start = time.perf_counter()
        futures = [pool.submit(async_noop, i) for i in range(n)]
        results = [future.result() for future in futures]
        elapsed = time.perf_counter() - start
    _check_sum(results, n)
    return elapsed


class _NoopTaskHooks:
    """Implements every per-task hook, doing nothing: the price of the calls themselves."""

    @taskplex.hookimpl
    def taskplex_task_submitted(self, task: Task) -> None:
        pass

    @taskplex.hookimpl
    def taskplex_task_lookup(self, task: Task) -> None:
        return None

    @taskplex.hookimpl
    def taskplex_task_started(self, task: Task) -> None:
        pass

    @taskplex.hookimpl
    def taskplex_task_finished(self, task: Task) -> None:
        pass

    @taskplex.hookimpl
    def taskplex_result_delivered(self, task: Task) -> None:
        pass


def _check_sum(results: list[Any], n: int) -> None:
    # A benchmark that timed failures would flatter the candidate.
    if sum(results) != n * (n - 1) // 2:
        raise RuntimeError(f"wrong results: expected 0..{n - 1}, got a different sum")


# ------------------------------------------------------------------ the benchmarks


def throughput(config: Config) -> Section:
    """Issue 2: no-op coroutines through the async backend, both ways in, vs asyncio.gather."""
    n = config.size(20_000, 2_000)
    note = f"workers={WORKERS}"
    candidates = [
        Candidate(GATHER, "async_vs_gather:gather", {}, n),
        Candidate(SERVER, "async_vs_gather:server", {"workers": WORKERS, "plugin": False}, n, note),
        Candidate(EXECUTOR, "async_vs_gather:executor", {"workers": WORKERS}, n, note),
    ]
    section = Section("async", f"{n:,} no-op coroutine tasks: async backend vs asyncio.gather")
    throughput_rows(
        section,
        run_interleaved(section.name, candidates, config.repeats),
        baseline=GATHER,
        targets=[Target(label, GATHER, 0.4, "gather") for label in (SERVER, EXECUTOR)],
    )
    return section


def hook_cost(config: Config) -> Section:
    """What a plugin implementing every per-task hook costs (unimplemented hooks are skipped)."""
    n = config.size(20_000, 2_000)
    note = f"workers={WORKERS}"
    candidates = [
        Candidate(NO_PLUGIN, "async_vs_gather:server", {"workers": WORKERS, "plugin": False}, n, note),
        Candidate(WITH_PLUGIN, "async_vs_gather:server", {"workers": WORKERS, "plugin": True}, n, note),
    ]
    section = Section("async-hooks", f"{n:,} no-op coroutine tasks: task hooks implemented vs none")
    measured = run_interleaved(section.name, candidates, config.repeats)
    throughput_rows(section, measured, baseline=NO_PLUGIN)
    without, with_hooks = measured
    if without.ok and with_hooks.ok:
        extra = statistics.median(with_hooks.samples) - statistics.median(without.samples)
        section.rows[1].note += f"; {extra / n * 1e6:+.2f} µs per task for 5 hook calls"
    return section
