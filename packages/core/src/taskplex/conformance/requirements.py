"""Gating tests on what a backend declares in its :class:`~taskplex.server.Capabilities`.

``@requires("cancel_running")`` runs a test only on backends that declare the capability;
``@lacks("cancel_running")`` only on those that do not (to check the outcome the contracts define
for them). A skipped test says which capability it needed and what that capability means. Besides
the fields of ``Capabilities``, two derived names exist: ``pickles_tasks``, true where tasks run
outside the caller's process (``remote`` or ``worker_processes``), and ``honours_cores``, true where
``resources.cores`` is among the resources the backend honours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import pytest

from taskplex.server import Capabilities

__all__ = ["MARKER", "declares", "lacks", "requires", "unmet"]

MARKER = "taskplex_capability"

_MEANING = {
    "cancel_running": "cancelling a running task really stops its work",
    "timeout_kills_work": "a task that times out has its work stopped",
    "survives_worker_death": "a worker killed mid-task is detected and its task retried or failed",
    "runs_coroutines": "coroutine functions are awaited",
    "remote": "tasks run outside the caller's process",
    "worker_processes": "tasks run in child processes of the caller",
    "forwards_logs": "log records emitted in a task reach the caller's logging",
    "pickles_tasks": "functions, arguments and results are pickled: remote or worker_processes",
    "withdraws_launched": "a task handed to the backend but not started can be withdrawn",
    "honours_cores": "a task's resources.cores is honoured (it takes that many worker slots)",
}

_DERIVED: dict[str, Callable[[Capabilities], bool]] = {
    "pickles_tasks": lambda caps: caps.remote or caps.worker_processes,
    "honours_cores": lambda caps: "cores" in caps.resources,
}


def _check_name(name: str) -> None:
    flags = {f.name for f in fields(Capabilities) if f.type in (bool, "bool")}
    if name not in flags and name not in _DERIVED:
        valid = ", ".join(sorted(flags | set(_DERIVED)))
        raise ValueError(f"unknown capability {name!r}; valid names are: {valid}")


def requires(name: str) -> pytest.MarkDecorator:
    """Run the test only on backends that declare capability ``name``."""
    _check_name(name)
    return pytest.mark.taskplex_capability(name, declared=True)


def lacks(name: str) -> pytest.MarkDecorator:
    """Run the test only on backends that do not declare capability ``name``."""
    _check_name(name)
    return pytest.mark.taskplex_capability(name, declared=False)


def declares(capabilities: Capabilities, name: str) -> bool:
    """Whether ``capabilities`` declare ``name`` (a Capabilities flag or a derived name)."""
    derived = _DERIVED.get(name)
    return derived(capabilities) if derived is not None else bool(getattr(capabilities, name))


def unmet(item: pytest.Item, backend: str, capabilities: Capabilities) -> str | None:
    """Why ``item`` must be skipped on this backend, or None if every requirement is met."""
    for mark in item.iter_markers(MARKER):
        name = mark.args[0]
        wanted = mark.kwargs.get("declared", True)
        if declares(capabilities, name) == wanted:
            continue
        meaning = _MEANING.get(name, name)
        if wanted:
            return f"backend {backend!r} does not declare {name} ({meaning})"
        return (
            f"backend {backend!r} declares {name} ({meaning}); this test checks the outcome "
            "defined for backends without it"
        )
    return None
