"""How to start and stop each process pool the mp benchmarks compare, taskplex's among them.

Every pool is used at the settings its documentation suggests for running many small tasks, and is
shut down completely before the measuring process ends (``harness`` checks that nothing is left).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import taskplex
from _tasks import noop
from harness import NotInstalled


@dataclass(frozen=True)
class Pool:
    """A running pool, reduced to what the benchmarks need."""

    submit: Callable[..., Any]
    """``submit(function, *args)``, returning a future."""
    gather: Callable[[list[Any]], list[Any]]
    """The results of a list of futures, fetched the way the pool fetches many at once."""


def _one_by_one(futures: list[Any]) -> list[Any]:
    return [future.result() for future in futures]


KINDS = ("taskplex", "ppe", "loky", "executorlib", "dask")


@contextmanager
def open_executor(kind: str, workers: int, backend: str) -> Iterator[cf.Executor]:
    """A ``concurrent.futures.Executor``: taskplex's, or the standard library's process pool."""
    if kind == "taskplex":
        try:
            executor: cf.Executor = taskplex.Executor(backend, workers=workers)
        except taskplex.UnknownBackend as exc:
            raise NotInstalled(str(exc)) from exc
    elif kind == "ppe":
        executor = cf.ProcessPoolExecutor(workers)
    else:
        raise ValueError(f"{kind!r} is not a concurrent.futures executor here")
    with executor:
        yield executor


@contextmanager
def open_pool(kind: str, workers: int, backend: str) -> Iterator[Pool]:
    """A running pool of ``kind`` (one of :data:`KINDS`)."""
    if kind in ("taskplex", "ppe"):
        with open_executor(kind, workers, backend) as executor:
            yield Pool(executor.submit, _one_by_one)
    elif kind == "loky":
        with _loky(workers) as pool:
            yield pool
    elif kind == "executorlib":
        with _executorlib(workers) as pool:
            yield pool
    elif kind == "dask":
        with _dask(workers) as pool:
            yield pool
    else:
        raise ValueError(f"unknown pool {kind!r}; known: {', '.join(KINDS)}")


@contextmanager
def _loky(workers: int) -> Iterator[Pool]:
    try:
        import loky
    except ImportError as exc:
        raise NotInstalled(f"loky: {exc}") from exc
    executor = loky.get_reusable_executor(max_workers=workers)
    try:
        yield Pool(executor.submit, _one_by_one)
    finally:
        executor.shutdown(wait=True, kill_workers=True)


@contextmanager
def _executorlib(workers: int) -> Iterator[Pool]:
    try:
        from executorlib import SingleNodeExecutor
    except ImportError as exc:
        raise NotInstalled(f"executorlib: {exc}") from exc
    # block_allocation keeps the worker processes alive between tasks, as the other pools do.
    with SingleNodeExecutor(max_workers=workers, block_allocation=True) as executor:
        yield Pool(executor.submit, _one_by_one)


@contextmanager
def _dask(workers: int) -> Iterator[Pool]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise NotInstalled(f"dask[distributed]: {exc}") from exc
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, Client(cluster) as client:  # type: ignore[no-untyped-call]
        client.wait_for_workers(workers)
        # pure=False: every call is a new task, as in the other pools (no hashing of arguments).
        # Client.gather fetches many results in one exchange with the scheduler.
        yield Pool(functools.partial(client.submit, pure=False), client.gather)


def ropt_noops(n: int, workers: int, warm_up: int) -> float:
    """Seconds for ``n`` no-op tasks through ropt's MultiprocessingServer, after ``warm_up`` ones.

    ropt is driven the way its users drive it: tasks are put on the server's task queue from the
    event loop, and results are read from a thread-safe ResultsQueue.
    """
    try:
        from ropt.workflow.servers import MultiprocessingServer, ResultsQueue, Task
    except ImportError as exc:
        raise NotInstalled(f"ropt: {exc}") from exc

    async def run() -> float:
        server = MultiprocessingServer(workers=workers)
        results = ResultsQueue()

        async def round_trip(count: int) -> None:
            for i in range(count):
                await server.task_queue.put(Task(function=noop, args=(i,), results_queue=results))
            finished = await asyncio.to_thread(lambda: [results.get() for _ in range(count)])
            # ropt puts None on the queue for a task it gave up on.
            values: list[Any] = [task.result for task in finished if task is not None]
            if len(values) != count or sum(values) != count * (count - 1) // 2:
                raise RuntimeError("ropt returned wrong results")

        async with asyncio.TaskGroup() as task_group:
            await server.start(task_group)
            try:
                await round_trip(warm_up)
                start = time.perf_counter()
                await round_trip(n)
                return time.perf_counter() - start
            finally:
                server.cancel()

    return asyncio.run(run())
