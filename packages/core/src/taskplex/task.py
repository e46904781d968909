"""A task: one call of a Python callable, its per-task policy, and the record of how it went."""

from __future__ import annotations

import enum
import itertools
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from taskplex.errors import InvalidOption, TaskCancelled

if TYPE_CHECKING:
    from taskplex.results import ResultsQueue
    from taskplex.scheduler import TaskServer

__all__ = ["Outcome", "Resources", "Task", "TaskStatus"]


class TaskStatus(enum.Enum):
    """Where a task is in its life: PENDING → QUEUED → RUNNING → one terminal state."""

    PENDING = "pending"
    """Created, not yet accepted by a server."""
    QUEUED = "queued"
    """Accepted by a server, not executing yet: waiting for its dependencies or a free worker, or
    handed to the backend ahead of time (prefetched, a pending cluster job)."""
    RUNNING = "running"
    """Executing: the backend reported that its work began."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Ended with an exception: the user's own, a timeout, or an infrastructure error."""
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(frozen=True)
class Resources:
    """What one task needs. A backend that cannot honour a request rejects the task at submit."""

    cores: int = 1
    gpus: int = 0
    memory: int | None = None
    """Megabytes, or None for the backend's default."""
    walltime: float | None = None
    """Seconds, or None for the backend's default."""

    def __post_init__(self) -> None:
        for field, minimum in (("cores", 1), ("gpus", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise InvalidOption(f"resources.{field} must be an int >= {minimum}, got {value!r}")
        if self.memory is not None and (not isinstance(self.memory, int) or self.memory <= 0):
            raise InvalidOption(f"resources.memory is in megabytes (int > 0), got {self.memory!r}")
        if self.walltime is not None and not _positive_number(self.walltime):
            raise InvalidOption(f"resources.walltime is in seconds (> 0), got {self.walltime!r}")

    @classmethod
    def coerce(cls, value: Resources | Mapping[str, Any] | None) -> Resources:
        """Accept a Resources, a mapping of its fields, or None (the defaults)."""
        if value is None:
            return DEFAULT_RESOURCES
        if isinstance(value, Resources):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise InvalidOption(
                    f"unknown resource(s) {sorted(unknown)}; valid ones are "
                    f"{sorted(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise InvalidOption(f"resources must be a Resources or a dict, got {type(value).__name__}")

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


DEFAULT_RESOURCES = Resources()


class _TaskIds:
    """Task ids unique across processes and hosts: a random prefix per process, then a counter.

    A forked child draws a new prefix, so it never repeats ids its parent hands out.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = f"{secrets.token_hex(6)}-"
        self.counter = itertools.count(1)


_ids = _TaskIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reset)


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )


class Task:
    """One call of ``function(*args, **kwargs)`` with its policy and its record.

    Policy (set by the caller): ``name`` (unique per server), ``key`` (what a journal or result
    cache knows the task by; see :func:`taskplex.keys.task_key`), ``timeout`` (seconds per attempt,
    counted from the moment the work really starts), ``retries`` (extra attempts after an
    infrastructure failure; after user errors too when ``retry_user_errors``), ``resources`` and
    ``depends_on`` (tasks that must succeed first).

    Record (set by the server): ``id`` (unique across processes and hosts), ``status``,
    ``attempts`` (attempts that started), ``submitted_at``, ``launched_at`` (first handed to the
    backend: a task launched but not started is with the backend, e.g. a pending cluster job),
    ``started_at``, ``finished_at`` (``time.time()`` values), ``worker`` (what ran it), and
    ``result`` or ``exception``. Finished
    tasks are put on ``results_queue``, exactly once each.
    """

    __slots__ = (
        "__weakref__",
        "_attempt",
        "_cancel_requested",
        "_enqueued",
        "_future",
        "_prepared",
        "_server",
        "args",
        "attempts",
        "depends_on",
        "exception",
        "finished_at",
        "function",
        "id",
        "key",
        "kwargs",
        "launched_at",
        "name",
        "resources",
        "result",
        "results_queue",
        "retries",
        "retry_user_errors",
        "started_at",
        "status",
        "submitted_at",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        function: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        key: str | None = None,
        results_queue: ResultsQueue | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_user_errors: bool = False,
        resources: Resources | Mapping[str, Any] | None = None,
        depends_on: Iterable[Task] = (),
    ) -> None:
        if not callable(function):
            raise InvalidOption(
                f"a task needs a callable as its function, got {type(function).__name__} {function!r}"
            )
        if type(args) is not tuple:
            if isinstance(args, str | bytes) or not isinstance(args, Iterable):
                raise InvalidOption(
                    f"args must be a tuple (or another iterable) of positional arguments, got "
                    f"{type(args).__name__} {args!r}; for one argument write args=({args!r},)"
                )
            args = tuple(args)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise InvalidOption(
                f"kwargs must be a mapping of keyword arguments, got {type(kwargs).__name__}"
            )
        if timeout is not None and not _positive_number(timeout):
            raise InvalidOption(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if retries != 0 and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
            raise InvalidOption(f"retries must be an int >= 0, got {retries!r}")
        if name is not None and not isinstance(name, str):
            raise InvalidOption(f"name must be a str or None, got {type(name).__name__}")
        if key is not None and not isinstance(key, str):
            raise InvalidOption(f"key must be a str or None, got {type(key).__name__}")
        self.function = function
        self.args: tuple[Any, ...] = args
        self.kwargs: dict[str, Any] = {} if kwargs is None else dict(kwargs)
        self.name = name
        self.key = key
        self.results_queue = results_queue
        self.timeout = timeout
        self.retries = retries
        self.retry_user_errors = retry_user_errors
        self.resources = DEFAULT_RESOURCES if resources is None else Resources.coerce(resources)
        self.depends_on: tuple[Task, ...] = ()
        if depends_on:
            if isinstance(depends_on, Task):
                depends_on = (depends_on,)
            self.depends_on = tuple(depends_on)
            for dep in self.depends_on:
                if not isinstance(dep, Task):
                    raise InvalidOption(f"depends_on takes Task objects, got {type(dep).__name__}")
        self.id = f"{_ids.prefix}{next(_ids.counter)}"
        self.status = TaskStatus.PENDING
        self.attempts = 0
        self.submitted_at: float | None = None
        self.launched_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.worker: str | None = None
        self.result: Any = None
        self.exception: BaseException | None = None
        # The server's bookkeeping, private to taskplex's core; cleared when the task finishes so
        # that a finished task holds no cycle through its server, future or attempt.
        self._server: TaskServer | None = None
        self._future: Any = None
        self._attempt: Any = None
        self._prepared: Any = None
        self._cancel_requested = False
        self._enqueued = False

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        fn = getattr(self.function, "__qualname__", None) or repr(self.function)
        return f"<Task {self.id}{label} {fn} {self.status.value}>"

    def done(self) -> bool:
        """True once the task reached a terminal state."""
        # finished_at is set with every terminal status; cheaper than hashing the enum member
        return self.finished_at is not None

    def cancelled(self) -> bool:
        """True if the task ended CANCELLED."""
        return self.status is TaskStatus.CANCELLED

    def cancel(self) -> bool:
        """Ask for the task to be cancelled; safe from any thread, idempotent.

        Returns True when the task is (or will at once be) CANCELLED. A task that has not started
        is cancelled for sure: its work never runs, also when the backend had already been handed
        it (a prefetched task, a pending cluster job). A running task is stopped where its backend
        can stop it (``cancel_running``); otherwise it runs to its end and this returns False.
        Cancelling a finished task does nothing and returns whether it ended CANCELLED.
        """
        if self.finished_at is not None:
            return self.status is TaskStatus.CANCELLED
        server = self._server
        if server is None:
            with CLAIM_LOCK:
                if self.status is TaskStatus.PENDING and self._server is None:
                    self.status = TaskStatus.CANCELLED
                    self.exception = TaskCancelled("cancelled before it was submitted")
                    self.finished_at = time.time()
                    return True
            if self._server is None:
                return self.status is TaskStatus.CANCELLED
            server = self._server
        return server.cancel_task(self)

    def outcome(self) -> Any:
        """The result of a finished task, or raise its exception (TaskCancelled if cancelled)."""
        if self.status is TaskStatus.SUCCEEDED:
            return self.result
        if self.exception is not None:
            raise self.exception
        raise RuntimeError(f"{self!r} has not finished")


CLAIM_LOCK = threading.Lock()
"""Guards a task's passage from PENDING to a server against a cancel() in another thread."""


class Outcome:
    """A result, or an exception to fail a task with; returned by ``taskplex_task_lookup``."""

    __slots__ = ("exception", "result")

    def __init__(self, result: Any = None, exception: BaseException | None = None) -> None:
        self.result = result
        self.exception = exception
