"""The conformance suite: the contracts of CONTRACTS.md as tests any backend can be held to.

Run it against every installed backend with ``pytest --pyargs taskplex.conformance`` (narrow it with
``--taskplex-backend NAME``; ``--taskplex-strict`` fails a backend that cannot run here instead of
skipping it). A backend author's whole conformance file is a subclass naming the backend::

    from taskplex.conformance import BackendSuite

    class TestMyBackend(BackendSuite):
        backend = "mybackend"  # an entry-point name, or the server class itself

The suite is a set of abstract test classes (one per area, combined in :class:`BackendSuite`) plus
fixtures a subclass may override, such as ``server_options``. Tests are gated on the capabilities a
backend declares, with the reason in the skip message; the suite never names a backend. Effects are
checked through side channels that do not go through the API under test: marker files written by the
task functions of :mod:`taskplex.conformance._tasks`, and the process table.

This package is imported by pytest at start-up (``taskplex.conformance.plugin`` is a ``pytest11``
plugin), so it imports nothing heavy until a suite class is asked for.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__all__ = [
    "BOUND",
    "BackendSuite",
    "CancellationTests",
    "ConcurrencyTests",
    "FailureTests",
    "LifecycleTests",
    "ObservabilityTests",
    "ResultsTests",
    "TimeoutTests",
    "lacks",
    "requires",
]


def _bound_from_environment() -> float:
    raw = os.environ.get("TASKPLEX_CONFORMANCE_BOUND", "30")
    try:
        bound = float(raw)
    except ValueError:
        bound = 0.0
    if not 0 < bound < float("inf"):
        raise ValueError(f"TASKPLEX_CONFORMANCE_BOUND must be a number of seconds > 0, got {raw!r}")
    return bound


BOUND = _bound_from_environment()
"""Seconds the suite waits for anything before it fails the test instead of hanging.

30 by default; set ``TASKPLEX_CONFORMANCE_BOUND`` for backends whose jobs wait longer to start.
"""

if TYPE_CHECKING:
    from taskplex.conformance.requirements import lacks, requires
    from taskplex.conformance.suite import (
        BackendSuite,
        CancellationTests,
        ConcurrencyTests,
        FailureTests,
        LifecycleTests,
        ObservabilityTests,
        ResultsTests,
        TimeoutTests,
    )

_LAZY = {
    "lacks": "taskplex.conformance.requirements",
    "requires": "taskplex.conformance.requirements",
}


def __getattr__(name: str) -> Any:
    if name not in __all__ or name == "BOUND":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY.get(name, "taskplex.conformance.suite"))
    return getattr(module, name)
