"""The conformance suite itself: how it is selected and run, and that it fails broken backends.

Each test runs pytest in a subprocess on a small test file, as a backend author would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

FORKED_BACKEND = (Path(__file__).parent / "forked_backend.py").read_text()

# Broken on purpose, each in one way a backend author could get wrong; the suite must notice.
BROKEN_BACKENDS = """
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from forked_backend import ForkedServer
from taskplex import Capabilities
from taskplex.conformance import BackendSuite
from taskplex_async import AsyncServer

LEAKED = []


@pytest.fixture(autouse=True, scope="module")
def _kill_leaked_processes():
    yield
    for process in LEAKED:
        process.kill()
        process.wait()


class SwallowsErrors(AsyncServer):
    async def execute(self, task):
        try:
            return await super().execute(task)
        except Exception:
            return None


class DeliversItself(AsyncServer):
    async def execute(self, task):
        result = await super().execute(task)
        task.results_queue.put(task)
        return result


class RunsOneAtATime(AsyncServer):
    def slots_for(self, task):
        return self.workers


class IgnoresWorkers(AsyncServer):
    async def startup(self):
        self._threads = ThreadPoolExecutor(4 * self.workers)

    def slots_for(self, task):
        return 0


class LeaksThreads(AsyncServer):
    forgotten = []

    async def shutdown(self):
        self.forgotten.append(self._threads)


class LeaksProcess(ForkedServer):
    async def startup(self):
        LEAKED.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))


class ClaimsCancelRunning(AsyncServer):
    capabilities = Capabilities(cancel_running=True)


class ClaimsTimeoutKillsWork(AsyncServer):
    capabilities = Capabilities(timeout_kills_work=True)


class TestSwallowsErrors(BackendSuite):
    backend = SwallowsErrors


class TestDeliversItself(BackendSuite):
    backend = DeliversItself


class TestRunsOneAtATime(BackendSuite):
    backend = RunsOneAtATime


class TestIgnoresWorkers(BackendSuite):
    backend = IgnoresWorkers


class TestLeaksThreads(BackendSuite):
    backend = LeaksThreads


class TestLeaksProcess(BackendSuite):
    backend = LeaksProcess


class TestClaimsCancelRunning(BackendSuite):
    backend = ClaimsCancelRunning


class TestClaimsTimeoutKillsWork(BackendSuite):
    backend = ClaimsTimeoutKillsWork
"""

# (test class, suite test it must fail, text the failure must contain)
EXPECTED_FAILURES = [
    ("TestSwallowsErrors", "test_user_exception_fails_only_its_task", "raise_failure succeeded"),
    ("TestDeliversItself", "test_every_task_is_delivered_exactly_once", "delivered twice"),
    ("TestRunsOneAtATime", "test_peak_concurrency_equals_workers", "3 tasks to run at once"),
    ("TestIgnoresWorkers", "test_peak_concurrency_equals_workers", "ran at once with workers=3"),
    ("TestLeaksThreads", "test_stop_cancels_queued_and_running_tasks", "thread 'taskplex-async"),
    ("TestLeaksProcess", "test_stop_cancels_queued_and_running_tasks", "time.sleep(60)"),
    ("TestClaimsCancelRunning", "test_cancel_running_task_stops_its_work", "reached 'done'"),
    ("TestClaimsTimeoutKillsWork", "test_timeout_kills_the_work", "reached 'done'"),
]


@pytest.fixture
def short_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits that must fail do so after 3 s instead of 30 (the subprocess inherits this)."""
    monkeypatch.setenv("TASKPLEX_CONFORMANCE_BOUND", "3")


def _selection(pairs: list[tuple[str, str]]) -> str:
    return " or ".join(f"({cls} and {test})" for cls, test in pairs)


@pytest.mark.usefixtures("short_bound")
def test_suite_fails_broken_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(forked_backend=FORKED_BACKEND, test_broken=BROKEN_BACKENDS)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-k",
        _selection([(c, t) for c, t, _ in EXPECTED_FAILURES]),
        timeout=120,
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == len(EXPECTED_FAILURES), result.stdout.str()
    assert "passed" not in outcomes
    report = result.stdout.str()
    for cls, test, evidence in EXPECTED_FAILURES:
        section = re.search(rf"_+ {cls}\.{test} _+\n(.*?)(?=\n_{{5,}} |\n=+ )", report, re.S)
        assert section is not None, f"no failure report for {cls}.{test}:\n{report}"
        assert evidence in section.group(1), f"{cls}.{test} failed for another reason:\n{section[1]}"


# Correct backends that exercise what neither shipped in-process backend has: killing work and
# workers (ForkedServer), and launching tasks ahead of a free worker (in_flight_limit > workers).
CORRECT_BACKENDS = """
from forked_backend import ForkedServer
from taskplex.conformance import BackendSuite
from taskplex_async import AsyncServer


class Pipelined(AsyncServer):
    def in_flight_limit(self):
        return 2 * self.workers


class TestForked(BackendSuite):
    backend = ForkedServer


class TestPipelined(BackendSuite):
    backend = Pipelined
"""


def test_suite_passes_correct_backends_with_other_capabilities(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(forked_backend=FORKED_BACKEND, test_correct=CORRECT_BACKENDS)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-rs",
        "-k",
        "(TestForked and (cancel_running or timeout_ or late_result or killed or unpicklable or stop))"
        " or (TestPipelined and (queued or stop or full or hooks or cancelled))",
        timeout=120,
    )
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes, result.stdout.str()
    assert "errors" not in outcomes, result.stdout.str()
    assert outcomes.get("passed", 0) >= 20, result.stdout.str()
    # the only skips are the tests of the capability each backend does (not) declare
    result.stdout.re_match_lines(
        [
            r".*SKIPPED \[1\].*'ForkedServer' declares cancel_running.*",
            r".*SKIPPED \[1\].*'Pipelined' does not declare cancel_running.*",
        ],
        consecutive=False,
    )
    assert outcomes.get("skipped") == 2, result.stdout.str()


def test_a_backend_authors_file_runs_only_that_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_mine="""
        from taskplex.conformance import BackendSuite

        class TestAsyncBackend(BackendSuite):
            backend = "async"
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-v", "-k", "delivered_exactly_once or starting_a_running"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*TestAsyncBackend::test_every_task_is_delivered_exactly_once PASSED*",
            "*TestAsyncBackend::test_starting_a_running_server_fails PASSED*",
        ]
    )


def test_a_suite_class_must_name_its_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_mine="""
        from taskplex.conformance import ResultsTests

        class TestUnnamed(ResultsTests):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "futures_keep")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*TestUnnamed must set the class attribute `backend`*"])


UNAVAILABLE = """
from taskplex import BackendUnavailable
from taskplex.conformance import ResultsTests
from taskplex_async import AsyncServer

class NeedsACluster(AsyncServer):
    @classmethod
    def conformance_options(cls, tmp_path):
        raise BackendUnavailable("no scheduler reachable from this machine")

class TestNeedsACluster(ResultsTests):
    backend = NeedsACluster
"""


def test_unavailable_backend_is_skipped_with_its_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cluster=UNAVAILABLE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "-k", "futures_keep")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*cannot run here: no scheduler reachable from this machine*"])


def test_strict_mode_fails_an_unavailable_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cluster=UNAVAILABLE)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--taskplex-strict", "-k", "futures_keep"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no scheduler reachable*--taskplex-strict*"])


def test_pyargs_run_is_narrowed_by_backend_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        "--pyargs",
        "taskplex.conformance.test_results",
        "--taskplex-backend",
        "async",
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*TestResults::test_futures_keep_results_after_shutdown[[]async[]] PASSED*"]
    )


def test_unknown_backend_option_names_the_installed_ones(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "taskplex.conformance.test_results",
        "--taskplex-backend",
        "no-such-backend",
        "-k",
        "futures_keep",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no taskplex backend named 'no-such-backend'*installed:*async*"])
