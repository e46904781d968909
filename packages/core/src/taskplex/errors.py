"""Exception types, and how exceptions cross a process or machine boundary.

Two families, so that callers and retry policies can tell them apart:

* a **user error** is whatever the task's function raised; it reaches the caller as itself (same type,
  same message) with the traceback of where it was raised chained as ``__cause__``
  (a :class:`RemoteTraceback`);
* an **infrastructure error** (:class:`InfrastructureError` and subclasses) means the machinery failed:
  the worker died, the job was killed, the result could not be read. Only these are retried by default.

:func:`capture_exception` turns an exception into a picklable :class:`ExceptionPayload` on the worker
side; :func:`restore_exception` rebuilds it on the caller side. An exception that cannot be pickled is
replaced by :class:`UnpicklableError`, which keeps its type name, message and traceback text.
"""

from __future__ import annotations

import linecache
import pickle
import re
import traceback
from concurrent.futures import CancelledError as _FuturesCancelledError
from dataclasses import dataclass

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "DependencyFailed",
    "DuplicateTaskName",
    "ExceptionPayload",
    "InfrastructureError",
    "InvalidOption",
    "JobCancelled",
    "JobFailed",
    "JobKilled",
    "JobOutOfMemory",
    "JobPreempted",
    "JobTimedOut",
    "JournalError",
    "NodeFailed",
    "QueueClosed",
    "RemoteTraceback",
    "ResourceUnavailable",
    "ResultUnreadable",
    "SerializationError",
    "ServerNotRunning",
    "TaskCancelled",
    "TaskTimeout",
    "TaskplexError",
    "UnknownBackend",
    "UnpicklableError",
    "UnstableKey",
    "WorkerLost",
    "capture_exception",
    "restore_exception",
    "with_source_lines",
]


class TaskplexError(Exception):
    """Base class of every error taskplex itself raises."""


# ---------------------------------------------------------------------------------------------------
# usage errors: raised at the call site, never delivered as a task outcome
# ---------------------------------------------------------------------------------------------------


class InvalidOption(TaskplexError, ValueError, TypeError):
    """An option given to a server or task is unknown or has the wrong type or value.

    A ValueError, as the standard library raises for a bad ``max_workers``, and a TypeError, as
    Python raises for an unknown keyword argument.
    """


class UnknownBackend(TaskplexError, LookupError):
    """No installed backend has the requested name."""


class BackendUnavailable(TaskplexError):
    """A backend is installed but cannot run here (e.g. no scheduler reachable); says why."""


class ServerNotRunning(TaskplexError, RuntimeError):
    """A task was submitted to a server that was never started or has stopped."""


class DuplicateTaskName(TaskplexError, ValueError):
    """A task name is already in use on this server."""


class ResourceUnavailable(TaskplexError, ValueError):
    """A task asks for resources the backend cannot provide."""


class SerializationError(TaskplexError, TypeError):
    """A function, argument or result could not be pickled; the message names the object."""


class QueueClosed(TaskplexError, RuntimeError):
    """A results queue was read after it was closed."""


# ---------------------------------------------------------------------------------------------------
# task outcomes that are not the user's own exception
# ---------------------------------------------------------------------------------------------------


class UnstableKey(TaskplexError, TypeError):
    """A task's journal key cannot be computed from its call: name it, or give it a ``key``."""


class JournalError(TaskplexError):
    """A journal file cannot be used: not a taskplex journal, corrupt, or from another version."""


class TaskCancelled(TaskplexError, _FuturesCancelledError):
    """The task was cancelled (by the caller, by server shutdown, or by a failed dependency).

    Subclasses :class:`concurrent.futures.CancelledError`, so code written for the standard library
    keeps working.
    """


class DependencyFailed(TaskCancelled):
    """The task was cancelled because a task it depends on failed or was cancelled.

    ``dependency`` describes the dependency that ended badly, and ``__cause__`` is the exception
    that started it all: the failure at the head of the dependency chain, however long the chain.
    It holds no reference to the tasks themselves.
    """

    def __init__(self, message: str, dependency: str = "") -> None:
        super().__init__(message)
        self.dependency = dependency

    def __reduce__(self) -> tuple[type[DependencyFailed], tuple[str, str]]:
        return (type(self), (str(self), self.dependency))


class TaskTimeout(TaskplexError, TimeoutError):
    """The task ran longer than its ``timeout``; the task's status is FAILED."""


class InfrastructureError(TaskplexError):
    """The machinery failed, not the task's function. Retried up to the task's ``retries``."""

    retryable: bool = True
    """Whether another attempt could succeed; False for failures that would only repeat."""


class BackendError(InfrastructureError):
    """A backend failed unexpectedly (a method or background loop raised, a call hung).

    The message says which part failed; ``__cause__`` is the original exception.
    """


class WorkerLost(InfrastructureError):
    """The worker running the task died (killed, crashed, out of memory); says how it ended."""


class JobKilled(InfrastructureError):
    """A batch scheduler ended the task's job; carries the scheduler's reason.

    The subclasses name the reasons a scheduler records, so that callers (and retries) can tell
    them apart without reading messages; a backend raises the most specific one it knows.
    """


class JobTimedOut(JobKilled):
    """The job reached its time limit (or deadline). Not retried: the same limit would expire."""

    retryable = False


class JobOutOfMemory(JobKilled):
    """The job exceeded the memory it asked for. Not retried: it would again."""

    retryable = False


class NodeFailed(JobKilled):
    """The job's node failed (or did not boot). Retried: another node may do."""


class JobPreempted(JobKilled):
    """The scheduler preempted the job for other work. Retried."""


class JobCancelled(JobKilled):
    """Someone outside taskplex cancelled the job. Not retried: it was meant to stop."""

    retryable = False


class JobFailed(WorkerLost):
    """The job's process ended with an error before the task's result was written. Retried."""


class ResultUnreadable(InfrastructureError):
    """The task ran but its result could not be read back.

    Not retried: the same result would fail to unpickle the same way again.
    """

    retryable = False


# ---------------------------------------------------------------------------------------------------
# exceptions across a boundary
# ---------------------------------------------------------------------------------------------------


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in another process or machine."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class UnpicklableError(TaskplexError):
    """Stands in for a user exception that could not be pickled."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type[UnpicklableError], tuple[str, str]]:
        return (type(self), (self.type_name, self.message))


@dataclass(frozen=True)
class ExceptionPayload:
    """A picklable record of an exception: the pickled exception (if possible) and its traceback."""

    pickled: bytes | None
    type_name: str
    message: str
    traceback: str


def capture_exception(exc: BaseException) -> ExceptionPayload:
    """Record ``exc`` so that it survives pickling; call where the exception was raised."""
    tb = "".join(traceback.format_exception(exc))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    pickled: bytes | None
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt (bad __init__)
        pickled = data
    except BaseException as error:  # a __reduce__ raising SystemExit spoils only the pickle
        if isinstance(error, KeyboardInterrupt):
            raise
        pickled = None
    return ExceptionPayload(pickled, type_name, str(exc), tb)


def restore_exception(payload: ExceptionPayload) -> BaseException:
    """Rebuild the exception recorded by :func:`capture_exception`, remote traceback chained."""
    exc: BaseException | None = None
    if payload.pickled is not None:
        try:
            exc = pickle.loads(payload.pickled)
        except BaseException as error:  # its type exists only where it was raised, say
            if isinstance(error, KeyboardInterrupt):
                raise
            exc = None
    if exc is None:
        exc = UnpicklableError(payload.type_name, payload.message)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{with_source_lines(payload.traceback)}"""')
    return exc


_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def with_source_lines(text: str) -> str:
    """Fill in the source lines a remote traceback lacks, from the files of this machine.

    A worker on another machine may not have the caller's script; this machine does, so frames of
    its functions show their source here as they would have in a local traceback.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for index, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        if match is None:
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if following.startswith("    "):
            continue  # the worker had the source
        source = linecache.getline(match["file"], int(match["line"])).strip()
        if source:
            out.append(f"    {source}\n")
    return "".join(out)
