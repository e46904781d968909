"""taskplex: run Python callables on pluggable execution backends with one API.

Names are imported from their modules on first use, so that a worker process that needs only
``taskplex.serialization`` (say) does not pay for the scheduler, the plugins and asyncio.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskplex.errors import (
        BackendError,
        BackendUnavailable,
        DependencyFailed,
        DuplicateTaskName,
        InfrastructureError,
        InvalidOption,
        JobCancelled,
        JobFailed,
        JobKilled,
        JobOutOfMemory,
        JobPreempted,
        JobTimedOut,
        JournalError,
        NodeFailed,
        QueueClosed,
        RemoteTraceback,
        ResourceUnavailable,
        ResultUnreadable,
        SerializationError,
        ServerNotRunning,
        TaskCancelled,
        TaskplexError,
        TaskTimeout,
        UnknownBackend,
        UnpicklableError,
        UnstableKey,
        WorkerLost,
    )
    from taskplex.executor import Executor, TaskFuture
    from taskplex.journal import Journal
    from taskplex.plugins import BackendInfo, backends, create_server, hookimpl
    from taskplex.results import ResultsQueue
    from taskplex.scheduler import ServerStats, TaskServer
    from taskplex.server import Capabilities, Server
    from taskplex.task import Outcome, Resources, Task, TaskStatus

_LAZY = {
    "BackendError": "taskplex.errors",
    "BackendInfo": "taskplex.plugins",
    "BackendUnavailable": "taskplex.errors",
    "Capabilities": "taskplex.server",
    "DependencyFailed": "taskplex.errors",
    "DuplicateTaskName": "taskplex.errors",
    "Executor": "taskplex.executor",
    "InfrastructureError": "taskplex.errors",
    "InvalidOption": "taskplex.errors",
    "JobCancelled": "taskplex.errors",
    "JobFailed": "taskplex.errors",
    "JobKilled": "taskplex.errors",
    "JobOutOfMemory": "taskplex.errors",
    "JobPreempted": "taskplex.errors",
    "JobTimedOut": "taskplex.errors",
    "Journal": "taskplex.journal",
    "JournalError": "taskplex.errors",
    "NodeFailed": "taskplex.errors",
    "Outcome": "taskplex.task",
    "QueueClosed": "taskplex.errors",
    "RemoteTraceback": "taskplex.errors",
    "ResourceUnavailable": "taskplex.errors",
    "Resources": "taskplex.task",
    "ResultUnreadable": "taskplex.errors",
    "ResultsQueue": "taskplex.results",
    "SerializationError": "taskplex.errors",
    "Server": "taskplex.server",
    "ServerNotRunning": "taskplex.errors",
    "ServerStats": "taskplex.scheduler",
    "Task": "taskplex.task",
    "TaskCancelled": "taskplex.errors",
    "TaskFuture": "taskplex.executor",
    "TaskServer": "taskplex.scheduler",
    "TaskStatus": "taskplex.task",
    "TaskTimeout": "taskplex.errors",
    "TaskplexError": "taskplex.errors",
    "UnknownBackend": "taskplex.errors",
    "UnpicklableError": "taskplex.errors",
    "UnstableKey": "taskplex.errors",
    "WorkerLost": "taskplex.errors",
    "backends": "taskplex.plugins",
    "create_server": "taskplex.plugins",
    "hookimpl": "taskplex.plugins",
}

__version__: str
"""The installed version of taskplex-core."""

__all__ = [
    "BackendError",
    "BackendInfo",
    "BackendUnavailable",
    "Capabilities",
    "DependencyFailed",
    "DuplicateTaskName",
    "Executor",
    "InfrastructureError",
    "InvalidOption",
    "JobCancelled",
    "JobFailed",
    "JobKilled",
    "JobOutOfMemory",
    "JobPreempted",
    "JobTimedOut",
    "Journal",
    "JournalError",
    "NodeFailed",
    "Outcome",
    "QueueClosed",
    "RemoteTraceback",
    "ResourceUnavailable",
    "Resources",
    "ResultUnreadable",
    "ResultsQueue",
    "SerializationError",
    "Server",
    "ServerNotRunning",
    "ServerStats",
    "Task",
    "TaskCancelled",
    "TaskFuture",
    "TaskServer",
    "TaskStatus",
    "TaskTimeout",
    "TaskplexError",
    "UnknownBackend",
    "UnpicklableError",
    "UnstableKey",
    "WorkerLost",
    "__version__",
    "backends",
    "create_server",
    "hookimpl",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("taskplex-core")
        except PackageNotFoundError:  # running from a source tree that is not installed
            return "0+unknown"
    raise AttributeError(f"module 'taskplex' has no attribute {name!r}")
