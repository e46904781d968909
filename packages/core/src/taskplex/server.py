"""The server contract every backend implements, and the capabilities a backend declares."""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskplex.task import Task

__all__ = ["Capabilities", "Server"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the conformance suite gates its tests on these, with the reason."""

    cancel_running: bool = False
    """Cancelling a running task really stops its work."""
    timeout_kills_work: bool = False
    """A task that times out has its work stopped, and the worker is usable again."""
    withdraws_launched: bool = True
    """A task handed to the backend but not started yet (prefetched, a pending job) can be
    withdrawn by cancel: it then never runs. Without it, cancel treats such a task as running."""
    survives_worker_death: bool = False
    """A worker killed mid-task is detected and replaced; its task is retried or fails WorkerLost."""
    runs_coroutines: bool = False
    """Coroutine functions are awaited (instead of returning a coroutine object)."""
    remote: bool = False
    """Tasks run outside the server's process (so arguments and results are pickled)."""
    worker_processes: bool = False
    """Tasks run in child processes of the server's process (the suite watches the process table)."""
    forwards_logs: bool = False
    """Log records emitted in a task reach the caller's logging (always true in-process)."""
    resources: frozenset[str] = field(default_factory=frozenset)
    """Resource requests honoured beyond the defaults: any of cores, gpus, memory, walltime."""

    def as_dict(self) -> dict[str, Any]:
        """The capabilities as a plain dict (resources as a sorted list)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["resources"] = sorted(self.resources)
        return out


class Server(abc.ABC):
    """The asynchronous server contract.

    A server runs inside an asyncio program: ``await server.start(task_group)`` starts it in the given
    :class:`asyncio.TaskGroup`; tasks are put on ``server.task_queue`` (or passed to
    ``await server.submit(task)``, which validates them first); each finished task is delivered to
    its own ``results_queue``. ``server.cancel()`` stops the server.
    """

    @property
    @abc.abstractmethod
    def task_queue(self) -> asyncio.Queue[Task]:
        """The queue the server takes tasks from; bounded by ``queue_size`` (0: unbounded)."""

    @property
    @abc.abstractmethod
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the server runs in, or None when it is not running."""

    @property
    @abc.abstractmethod
    def task_group(self) -> asyncio.TaskGroup | None:
        """The task group the server runs in, or None when it is not running."""

    @abc.abstractmethod
    async def start(self, task_group: asyncio.TaskGroup) -> None:
        """Start the server in ``task_group``; raise RuntimeError if it is already running."""

    @abc.abstractmethod
    async def submit(self, task: Task) -> Task:
        """Validate ``task`` and put it on the task queue (waiting while the queue is full)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the server: queued tasks are cancelled, running ones stopped. Idempotent."""

    @abc.abstractmethod
    def is_running(self) -> bool:
        """True while the server accepts tasks."""
