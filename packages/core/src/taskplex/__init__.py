"""taskplex: run Python callables on pluggable execution backends with one API."""

from taskplex.errors import (
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
from taskplex.server import Capabilities, Server
from taskplex.serverbase import ServerBase, ServerStats
from taskplex.task import Outcome, Resources, Task, TaskStatus

__all__ = [
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
    "ServerBase",
    "ServerNotRunning",
    "ServerStats",
    "Task",
    "TaskCancelled",
    "TaskFuture",
    "TaskStatus",
    "TaskTimeout",
    "TaskplexError",
    "UnknownBackend",
    "UnpicklableError",
    "WorkerLost",
    "backends",
    "create_server",
    "hookimpl",
]
