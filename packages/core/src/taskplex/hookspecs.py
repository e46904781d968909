"""Hook specifications: every point where a plugin can extend taskplex.

Hooks are coarse and few. Those on the per-task path are skipped entirely when no plugin implements
them, so an unused hook costs nothing per task. Implementations may accept fewer arguments than a
spec names; new arguments may be added to a spec later, never removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from taskplex.conformance.provider import TestProvider
    from taskplex.results import ResultsQueue
    from taskplex.server import Server
    from taskplex.task import Outcome, Task

hookspec = pluggy.HookspecMarker("taskplex")


# ---------------------------------------------------------------------------------------------------
# server hooks
# ---------------------------------------------------------------------------------------------------


@hookspec
def taskplex_register_servers(register: Callable[[str, type[Server]], None]) -> None:
    """Register server classes by calling ``register(name, server_class)``.

    Called each time backends are looked up (creating an Executor by name, listing backends); it must
    be cheap and have no side effects. ``name`` is what users pass to
    ``taskplex.Executor(name)``; by convention it equals the plugin's entry-point name in the
    ``taskplex`` group.
    """


@hookspec
def taskplex_server_started(server: Server) -> None:
    """Called once each time a server has started and accepts tasks."""


@hookspec
def taskplex_server_stopped(server: Server) -> None:
    """Called once each time a server has stopped, after every task reached a terminal state."""


# ---------------------------------------------------------------------------------------------------
# task hooks
# ---------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def taskplex_task_lookup(task: Task, server: Server) -> Outcome | None:
    """Supply the outcome of a task without running it (a result cache, a restart journal).

    Called once per task when it is about to run, after its dependencies succeeded. Stops at the first
    non-None result; a returned :class:`~taskplex.task.Outcome` finishes the task with that
    result or exception, and ``taskplex_task_started`` is not called for it.
    """


@hookspec
def taskplex_task_submitted(task: Task, server: Server) -> None:
    """Called once per task when a server accepts it (status QUEUED), in the server's loop."""


@hookspec
def taskplex_task_started(task: Task, server: Server) -> None:
    """Called once per task when it is handed to a worker (first attempt only).

    Not called for a task that finished before it ran (cancelled, failed dependency, looked up).
    """


@hookspec
def taskplex_task_finished(task: Task, server: Server) -> None:
    """Called once per task when it reached its terminal state, just before delivery."""


# ---------------------------------------------------------------------------------------------------
# results-queue hooks
# ---------------------------------------------------------------------------------------------------


@hookspec
def taskplex_result_delivered(task: Task, results_queue: ResultsQueue) -> None:
    """Called once per task right after it was put on its results queue."""


# ---------------------------------------------------------------------------------------------------
# command-line hooks
# ---------------------------------------------------------------------------------------------------


@hookspec
def taskplex_add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add sub-commands to the ``taskplex`` command line.

    Called once when the CLI starts. Add a parser with ``subparsers.add_parser(...)`` and set its
    ``handler`` default to a callable taking the parsed ``argparse.Namespace`` and returning an exit
    code.
    """


# ---------------------------------------------------------------------------------------------------
# conformance hooks
# ---------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def taskplex_test_provider(backend: str) -> TestProvider | None:
    """The :class:`~taskplex.conformance.provider.TestProvider` for the backend named ``backend``.

    Called by the conformance suite, once per backend it runs against; stops at the first
    non-None result. Return None for backends that are not yours. Import your provider inside the
    implementation, so that loading the plugin stays cheap for everything else.
    """
