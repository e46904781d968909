"""The abstract test classes of the suite, one per area, and :class:`BackendSuite` combining them.

Each area class holds the tests of some contracts; the suite's own ``test_*`` modules run each of
them against every installed backend. A backend author subclasses :class:`BackendSuite` (or only
some areas) and sets ``backend``.
"""

from __future__ import annotations

from taskplex.conformance.test_cancellation import CancellationTests
from taskplex.conformance.test_concurrency import ConcurrencyTests
from taskplex.conformance.test_failures import FailureTests
from taskplex.conformance.test_lifecycle import LifecycleTests
from taskplex.conformance.test_observability import ObservabilityTests
from taskplex.conformance.test_results import ResultsTests
from taskplex.conformance.test_timeouts import TimeoutTests

__all__ = [
    "BackendSuite",
    "CancellationTests",
    "ConcurrencyTests",
    "FailureTests",
    "LifecycleTests",
    "ObservabilityTests",
    "ResultsTests",
    "TimeoutTests",
]


class BackendSuite(
    LifecycleTests,
    FailureTests,
    CancellationTests,
    ConcurrencyTests,
    TimeoutTests,
    ResultsTests,
    ObservabilityTests,
):
    """Every contract the suite checks (C1-C17, C19, C20, C22). Subclass it and set ``backend``.

    ``backend`` is an installed backend's name (its entry point in the ``taskplex`` group) or a
    :class:`~taskplex.ServerBase` subclass. Override the ``server_options`` fixture to create the
    server with other options than its ``conformance_options``.
    """
