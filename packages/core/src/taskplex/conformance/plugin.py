"""pytest plugin of the conformance suite: its command-line options and marker.

Loaded in every pytest run of an environment where taskplex-core is installed (entry point
``pytest11: taskplex``), so it imports only pytest; the suite itself is imported when a test module
asks for it.
"""

from __future__ import annotations

import os

import pytest

from taskplex.conformance import BOUND

SUITE_MODULES = (
    "taskplex.conformance._base",
    "taskplex.conformance._support",
    "taskplex.conformance.suite",
    "taskplex.conformance.test_cancellation",
    "taskplex.conformance.test_concurrency",
    "taskplex.conformance.test_failures",
    "taskplex.conformance.test_lifecycle",
    "taskplex.conformance.test_observability",
    "taskplex.conformance.test_results",
    "taskplex.conformance.test_timeouts",
)

# A hung backend must fail its test: each scenario waits at most a few BOUNDs (its own failure
# is reported well before this last resort).
SUITE_TIMEOUT = 8 * BOUND

# Third parties may collect only their own files (other python_files patterns), so the suite's
# modules are registered for assertion rewriting by name rather than by file pattern.
pytest.register_assert_rewrite(*SUITE_MODULES)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("taskplex", "taskplex conformance suite")
    group.addoption(
        "--taskplex-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="run the conformance suite only against this installed backend (repeatable); "
        "default: every installed backend",
    )
    group.addoption(
        "--taskplex-strict",
        action="store_true",
        default=False,
        help="fail, instead of skipping, a backend that cannot run here "
        "(its conformance_options raised BackendUnavailable)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "taskplex_capability(name, declared): run the test only on backends whose "
        "capabilities.<name> is (or, with declared=False, is not) declared",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("timeout") or _timeout_configured(config):
        return
    for item in items:
        cls = getattr(item, "cls", None)
        if getattr(cls, "taskplex_suite", False) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SUITE_TIMEOUT))


def _timeout_configured(config: pytest.Config) -> bool:
    return bool(
        config.getoption("timeout", None) or os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout")
    )
