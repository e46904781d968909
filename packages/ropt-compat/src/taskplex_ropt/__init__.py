"""ropt's evaluation servers (``ropt.workflow.servers``, ropt 0.28) on taskplex.

Change ``from ropt.workflow.servers import ...`` to ``from taskplex_ropt import ...``; nothing else.
The servers are taskplex servers (:class:`taskplex.TaskServer`) built with ropt's option names and
defaults. They run ropt's own task objects — those ropt's ``AsyncEvaluator`` puts on
``server.task_queue`` — as well as taskplex's: an object in ropt's task protocol gets its result
through ``put_result``, and ``cancel_all`` when it failed or was cancelled. :class:`Task` and
:class:`ResultsQueue` here are drop-in copies of ropt's, for code that builds tasks itself.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskplex import Server
from taskplex_async import AsyncServer
from taskplex_mp import MultiprocessingServer as _TaskplexMultiprocessingServer

if TYPE_CHECKING:
    from taskplex_hpc import HPCServer

__all__ = [
    "MIN_INTERVAL",
    "HPCServer",
    "MultiprocessingServer",
    "ResultsQueue",
    "Server",
    "Task",
    "ThreadingServer",
]


MIN_INTERVAL = 0.1
"""Seconds between polls of the HPC queue when ropt's code asks for ``interval=0``."""


class ThreadingServer(AsyncServer):
    """ropt's ``ThreadingServer``: each task's function runs in one of ``workers`` threads."""

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        super().__init__(workers=workers, queue_size=queue_size)


class MultiprocessingServer(_TaskplexMultiprocessingServer):
    """ropt's ``MultiprocessingServer``: ``workers`` supervised processes (ropt's default: 1).

    ``max_tasks_per_child`` restarts a worker after that many tasks, as in ropt. taskplex's own
    options (``start_method``) may be passed too.
    """

    def __init__(
        self,
        *,
        workers: int = 1,
        queue_size: int = 0,
        max_tasks_per_child: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            workers=workers, queue_size=queue_size, max_tasks_per_child=max_tasks_per_child, **options
        )


@dataclass(kw_only=True)
class Task:
    """ropt's ``Task``: a call whose result is put on ``results_queue`` by ``put_result``."""

    function: Callable[..., Any]
    args: tuple[Any, ...] = field(default_factory=tuple)
    kwargs: dict[str, Any] = field(default_factory=dict)
    results_queue: ResultsQueue
    result: Any | None = None
    name: str | None = None

    def put_result(self, result: Any) -> None:
        """Set the result and put this task on its results queue."""
        self.result = result
        self.results_queue.put(self)

    def cancel_all(self) -> None:
        """Tell the reader nothing more comes: put None on the results queue and close it."""
        self.results_queue.put(None)
        self.results_queue.close()


class ResultsQueue(queue.Queue[Task | None]):
    """ropt's ``ResultsQueue``: a thread queue that drops what is put after :meth:`close`."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.closed = False

    def close(self) -> None:
        """Drop everything put from now on."""
        self.closed = True

    def put(self, item: Task | None, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item`` unless the queue is closed."""
        if not self.closed:
            super().put(item, block, timeout)


def __getattr__(name: str) -> Any:
    if name == "HPCServer":
        return _hpc_server_class()
    raise AttributeError(f"module 'taskplex_ropt' has no attribute {name!r}")


def _hpc_server_class() -> type[Server]:
    try:
        from taskplex_hpc import HPCServer as _TaskplexHPCServer
    except ImportError as exc:
        raise ImportError(
            "taskplex_ropt.HPCServer needs the hpc backend: pip install 'taskplex-ropt[hpc]' "
            f"(or taskplex-backend-hpc) ({exc})"
        ) from exc

    class HPCServer(_TaskplexHPCServer):
        """ropt's ``HPCServer``, with ropt's defaults (``workdir="./"``, ``interval=1``).

        ``interval=0`` (ropt: poll without pause) becomes :data:`MIN_INTERVAL`; an empty
        ``template`` means none (the backend's own submission script). ``retries``
        and ``cleanup`` are accepted and have no effect: taskplex learns how each job ended from
        the scheduler, and removes the job files when the server stops.
        """

        def __init__(
            self,
            *,
            workdir: Path | str = "./",
            interval: float = 1,
            template: str | None = None,
            retries: int = 30,
            cleanup: bool = True,
            **options: Any,
        ) -> None:
            del retries, cleanup
            super().__init__(
                workdir=workdir,
                interval=max(interval, MIN_INTERVAL),
                template=template or None,
                **options,
            )

    globals()["HPCServer"] = HPCServer
    return HPCServer
