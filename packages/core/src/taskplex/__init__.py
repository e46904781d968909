"""taskplex: run Python callables on pluggable execution backends with one API."""

from taskplex.errors import (
    BackendError,
    BackendUnavailable,
    DependencyFailed,
    DuplicateTaskName,
    InfrastructureError,
    InvalidOption,
    JobKilled,
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
    WorkerLost,
)
from taskplex.executor import Executor, TaskFuture
from taskplex.plugins import BackendInfo, backends, create_server, hookimpl
from taskplex.results import ResultsQueue
from taskplex.scheduler import ServerStats, TaskServer
from taskplex.server import Capabilities, Server
from taskplex.task import Outcome, Resources, Task, TaskStatus

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
    "JobKilled",
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
    "WorkerLost",
    "__version__",
    "backends",
    "create_server",
    "hookimpl",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("taskplex-core")
        except PackageNotFoundError:  # running from a source tree that is not installed
            return "0+unknown"
    raise AttributeError(f"module 'taskplex' has no attribute {name!r}")
