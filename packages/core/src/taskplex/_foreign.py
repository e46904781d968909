"""Task objects of other frameworks on a server's task queue: ropt's protocol.

A program written for ropt's evaluation servers puts its own task objects on
``server.task_queue``: objects with ``function``, ``args``, ``kwargs``, ``name``, a
``results_queue``, ``put_result(result)`` and ``cancel_all()``. A :class:`TaskServer` takes them
as they are: it runs each as a :class:`~taskplex.task.Task` and hands the outcome back to the
object — ``put_result(result)`` when it succeeded, ``cancel_all()`` when it failed or was
cancelled (the exception, if any, is logged and set as the object's ``exception``). Hand-backs
run in a thread of their own, in order: ``put_result`` may block on a bounded queue, and the
server's loop must not. An object that is not such a task fails alone: it is logged and, if it
has ``cancel_all``, told so; the server keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

from taskplex.task import Task, TaskStatus

__all__ = ["ForeignTasks", "is_foreign_task"]

logger = logging.getLogger("taskplex.scheduler")

_PROTOCOL = ("function", "results_queue", "put_result")

_Entry = tuple[Any, Task | None, BaseException | None]
"""A foreign task object, the Task that ran it (None: it never ran), and why it failed."""


def is_foreign_task(item: object) -> bool:
    """Whether ``item`` follows ropt's task protocol (and is not a taskplex Task)."""
    return not isinstance(item, Task) and all(hasattr(item, name) for name in _PROTOCOL)


class ForeignTasks:
    """Adopts foreign task objects as Tasks and hands their outcomes back, in order."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._origins: dict[str, Any] = {}
        self._outbox: queue.SimpleQueue[_Entry | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def adopt(self, item: Any) -> Task:
        """A Task running ``item``'s call, whose outcome goes back to ``item``; raises if invalid."""
        args = getattr(item, "args", ()) or ()
        kwargs = getattr(item, "kwargs", None) or None
        task = Task(item.function, args, kwargs, name=getattr(item, "name", None))
        task.results_queue = self  # type: ignore[assignment]  # duck-typed: put() below
        self._origins[task.id] = item
        return task

    def refuse(self, item: Any, error: BaseException) -> None:
        """``item`` cannot run (not a task, or invalid): tell it, without running anything."""
        self._send((item, None, error))

    def put(self, task: Task) -> None:
        """The server delivers a finished adopted task here (its results queue)."""
        item = self._origins.pop(task.id, None)
        if item is not None:
            self._send((item, task, None))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every outcome so far was handed back; False if ``timeout`` passed first."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._outbox.put(done)
        return done.wait(timeout)

    def _send(self, entry: _Entry) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._hand_back, name=f"taskplex-handback {self._owner}", daemon=True
                    )
                    self._thread.start()
        self._outbox.put(entry)

    def _hand_back(self) -> None:
        while True:
            entry = self._outbox.get()
            if isinstance(entry, threading.Event):
                entry.set()
                continue
            item, task, error = entry
            try:
                if task is not None and task.status is TaskStatus.SUCCEEDED:
                    item.put_result(task.result)
                    continue
                if task is not None:
                    error = task.exception
                if error is not None and not (task is not None and task.status is TaskStatus.CANCELLED):
                    logger.error(
                        "%s: task %r failed: %s: %s",
                        self._owner,
                        getattr(item, "name", None) or item,
                        type(error).__name__,
                        error,
                        exc_info=error,
                    )
                with contextlib.suppress(Exception):
                    item.exception = error
                cancel_all = getattr(item, "cancel_all", None)
                if callable(cancel_all):
                    cancel_all()
            except Exception:
                logger.exception("%s: handing an outcome back to %r failed", self._owner, item)
