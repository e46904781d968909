"""A task: one call of a Python callable, its per-task policy, and the record of how it went."""

from __future__ import annotations

import enum
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from taskplex.errors import InvalidOption, TaskCancelled

if TYPE_CHECKING:
    from taskplex.results import ResultsQueue
    from taskplex.serverbase import ServerBase

__all__ = ["Outcome", "Resources", "Task", "TaskStatus"]


class TaskStatus(enum.Enum):
    """Where a task is in its life: PENDING → QUEUED → RUNNING → one terminal state."""

    PENDING = "pending"
    """Created, not yet accepted by a server."""
    QUEUED = "queued"
    """Accepted by a server, waiting for a worker (or for its dependencies)."""
    RUNNING = "running"
    """Handed to a worker."""
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
_ids = itertools.count(1)


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )


class Task:
    """One call of ``function(*args, **kwargs)`` with its policy and its record.

    Policy (set by the caller): ``name`` (unique per server), ``timeout`` (seconds, per attempt),
    ``retries`` (extra attempts after an infrastructure failure; after user errors too when
    ``retry_user_errors``), ``resources`` and ``depends_on`` (tasks that must succeed first).

    Record (set by the server): ``status``, ``attempts``, ``submitted_at``, ``started_at``,
    ``finished_at`` (``time.time()`` values), ``worker`` (what ran it), and ``result`` or
    ``exception``. Finished tasks are put on ``results_queue``, exactly once each.
    """

    __slots__ = (
        "_future",
        "_server",
        "_token",
        "args",
        "attempts",
        "depends_on",
        "exception",
        "finished_at",
        "function",
        "id",
        "kwargs",
        "name",
        "payload",
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
        results_queue: ResultsQueue | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_user_errors: bool = False,
        resources: Resources | Mapping[str, Any] | None = None,
        depends_on: Iterable[Task] = (),
    ) -> None:
        if not callable(function):
            raise InvalidOption(f"a task needs a callable, got {type(function).__name__} {function!r}")
        if timeout is not None and not _positive_number(timeout):
            raise InvalidOption(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise InvalidOption(f"retries must be an int >= 0, got {retries!r}")
        if name is not None and not isinstance(name, str):
            raise InvalidOption(f"name must be a str or None, got {type(name).__name__}")
        self.function = function
        self.args = args if type(args) is tuple else tuple(args)
        self.kwargs: dict[str, Any] = {} if kwargs is None else dict(kwargs)
        self.name = name
        self.results_queue = results_queue
        self.timeout = timeout
        self.retries = retries
        self.retry_user_errors = retry_user_errors
        self.resources = DEFAULT_RESOURCES if resources is None else Resources.coerce(resources)
        self.depends_on: tuple[Task, ...] = tuple(depends_on)
        for dep in self.depends_on:
            if not isinstance(dep, Task):
                raise InvalidOption(f"depends_on takes Task objects, got {type(dep).__name__}")
        self.id = next(_ids)
        self.status = TaskStatus.PENDING
        self.attempts = 0
        self.submitted_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.worker: str | None = None
        self.result: Any = None
        self.exception: BaseException | None = None
        self.payload: Any = None
        """Backend-private data (e.g. the serialised call); cleared when the task finishes."""
        self._server: ServerBase | None = None
        self._token = 0
        self._future: Any = None

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        fn = getattr(self.function, "__qualname__", repr(self.function))
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

        A task that has not started is cancelled for sure: it will never run. A running task is
        stopped when its backend declares ``cancel_running``; otherwise it runs to its end and this
        returns False. Cancelling a finished task does nothing and returns False. Returns True when
        the task is (or will shortly be) CANCELLED.
        """
        server = self._server
        if server is None:
            with _unattached_lock:
                if self.status is TaskStatus.PENDING:
                    self.status = TaskStatus.CANCELLED
                    self.exception = TaskCancelled("cancelled before it was submitted")
                    self.finished_at = time.time()
                    return True
            return self.status is TaskStatus.CANCELLED
        return server.cancel_task(self)

    def outcome(self) -> Any:
        """The result of a finished task, or raise its exception (TaskCancelled if cancelled)."""
        if self.status is TaskStatus.SUCCEEDED:
            return self.result
        if self.exception is not None:
            raise self.exception
        raise RuntimeError(f"{self!r} has not finished")


_unattached_lock = threading.Lock()


class Outcome:
    """A result, or an exception to fail a task with; returned by ``taskplex_task_lookup``."""

    __slots__ = ("exception", "result")

    def __init__(self, result: Any = None, exception: BaseException | None = None) -> None:
        self.result = result
        self.exception = exception
