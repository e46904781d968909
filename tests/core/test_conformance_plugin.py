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
import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from forked_backend import ForkedBackend, HeldBackend, _fork
from taskplex import Capabilities, TaskCancelled, TaskServer
from taskplex.conformance import BackendSuite
from taskplex_async import AsyncBackend
from taskplex_mp import MultiprocessingServer
from taskplex_mp._worker_handle import WorkerHandle

LEAKED = []


@pytest.fixture(autouse=True, scope="module")
def _kill_leaked_processes():
    yield
    for process in LEAKED:
        process.kill()
        process.wait()


def server_of(backend_class):
    class Server(TaskServer):
        def __init__(self, *, workers=1, queue_size=0):
            super().__init__(backend_class(), workers=workers, queue_size=queue_size)

    Server.backend_class = backend_class
    Server.__name__ = backend_class.__name__
    return Server


class SwallowsErrors(AsyncBackend):
    async def execute(self, attempt):
        try:
            return await super().execute(attempt)
        except Exception:
            return None


class DeliversItself(AsyncBackend):
    async def execute(self, attempt):
        result = await super().execute(attempt)
        attempt.task.results_queue.put(attempt.task)
        return result


class RunsOneAtATime(AsyncBackend):
    async def start(self, context):
        await super().start(context)
        self.workers = context.workers

    def slots(self, task):
        return self.workers


class IgnoresWorkers(AsyncBackend):
    def slots(self, task):
        return 0


class LeaksThreads(AsyncBackend):
    forgotten = []

    async def stop(self):
        self.forgotten.append(self._threads)


class LeaksProcess(ForkedBackend):
    async def start(self, context):
        LEAKED.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))


class ClaimsCancelRunning(AsyncBackend):
    capabilities = Capabilities(cancel_running=True)


class ClaimsTimeoutKillsWork(AsyncBackend):
    capabilities = Capabilities(timeout_kills_work=True)


def _exits_on_base_exceptions(payload, results):
    import cloudpickle

    function, args, kwargs = cloudpickle.loads(payload)
    try:
        message = (True, function(*args, **kwargs))
    except Exception as exc:  # wrong: a BaseException of the task ends the whole process
        from taskplex.errors import capture_exception

        message = (False, capture_exception(exc))
    results.send(message)


class DiesOnBaseExceptions(ForkedBackend):
    async def execute(self, attempt):
        import forked_backend

        forked_backend._run_in_child = _exits_on_base_exceptions
        return await super().execute(attempt)


class WithdrawsNothing(HeldBackend):
    def run(self, attempt):
        attempt.started()  # and runs it even if it was withdrawn
        task = attempt.task
        try:
            attempt.succeeded(task.function(*task.args, **task.kwargs))
        except BaseException as exc:
            attempt.failed(exc)


class ReportsAbortedOverAtOnce(AsyncBackend):
    def abort(self, attempt):
        attempt.failed(TaskCancelled("reported over, but its thread runs on"))
        super().abort(attempt)


class IgnoresCores(AsyncBackend):
    capabilities = Capabilities(resources=frozenset({"cores"}))

    def slots(self, task):
        return 1


class HangsOnStop(AsyncBackend):
    async def stop(self):
        await asyncio.Event().wait()


_sort_held_tasks = WorkerHandle.sort_held_tasks


def _forget_unstarted(self, previous, how):
    settled, _ = _sort_held_tasks(self, previous, how)
    return settled, []  # wrong: what the dead worker held but never started is lost


class ForgetsHeldTasks(MultiprocessingServer):
    pass


@pytest.fixture(autouse=True)
def _forgetful_workers(request):
    if request.cls is TestForgetsHeldTasks:
        WorkerHandle.sort_held_tasks = _forget_unstarted
    yield
    WorkerHandle.sort_held_tasks = _sort_held_tasks


class TestSwallowsErrors(BackendSuite):
    backend = server_of(SwallowsErrors)


class TestDeliversItself(BackendSuite):
    backend = server_of(DeliversItself)


class TestRunsOneAtATime(BackendSuite):
    backend = server_of(RunsOneAtATime)


class TestIgnoresWorkers(BackendSuite):
    backend = server_of(IgnoresWorkers)


class TestLeaksThreads(BackendSuite):
    backend = server_of(LeaksThreads)


class TestLeaksProcess(BackendSuite):
    backend = server_of(LeaksProcess)


class TestClaimsCancelRunning(BackendSuite):
    backend = server_of(ClaimsCancelRunning)


class TestClaimsTimeoutKillsWork(BackendSuite):
    backend = server_of(ClaimsTimeoutKillsWork)


class TestDiesOnBaseExceptions(BackendSuite):
    backend = server_of(DiesOnBaseExceptions)


class TestWithdrawsNothing(BackendSuite):
    backend = server_of(WithdrawsNothing)


class TestReportsAbortedOverAtOnce(BackendSuite):
    backend = server_of(ReportsAbortedOverAtOnce)


class TestIgnoresCores(BackendSuite):
    backend = server_of(IgnoresCores)


class TestHangsOnStop(BackendSuite):
    backend = server_of(HangsOnStop)


class TestForgetsHeldTasks(BackendSuite):
    backend = ForgetsHeldTasks
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
    (
        "TestDiesOnBaseExceptions",
        "test_base_exceptions_fail_only_their_task[SystemExit]",
        "must fail with its own type",
    ),
    ("TestWithdrawsNothing", "test_cancelled_launched_task_never_starts", "reached 'started'"),
    (
        "TestReportsAbortedOverAtOnce",
        "test_peak_concurrency_holds_after_timeouts_and_cancels[timed_out]",
        "tasks ran at once with workers=2, after timeouts",
    ),
    ("TestIgnoresCores", "test_a_multi_core_task_takes_its_cores_in_slots", "cores in use at once"),
    ("TestHangsOnStop", "test_stop_cancels_queued_and_running_tasks", "did not finish within"),
    (
        "TestForgetsHeldTasks",
        "test_tasks_held_by_a_killed_worker_are_delivered_once",
        "expected task(s) were delivered",
    ),
]


@pytest.fixture
def short_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits that must fail do so after 3 s instead of 30 (the subprocess inherits this)."""
    monkeypatch.setenv("TASKPLEX_CONFORMANCE_BOUND", "3")


def _selection(pairs: list[tuple[str, str]]) -> str:
    """A -k expression for (class, test) pairs; a test may name its parameter: ``test[param]``."""
    terms = []
    for cls, test in pairs:
        name, _, param = test.partition("[")
        terms.append(" and ".join(filter(None, [cls, name, param.rstrip("]")])))
    return " or ".join(f"({term})" for term in terms)


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
        section = re.search(rf"_+ {cls}\.{re.escape(test)} _+\n(.*?)(?=\n_{{5,}} |\n=+ )", report, re.S)
        assert section is not None, f"no failure report for {cls}.{test}:\n{report}"
        assert evidence in section.group(1), f"{cls}.{test} failed for another reason:\n{section[1]}"


# Correct backends that exercise what neither shipped in-process backend has: killing work and
# workers (ForkedServer), and launching tasks ahead of a free worker (HeldServer).
CORRECT_BACKENDS = """
from forked_backend import ForkedServer, HeldServer
from taskplex.conformance import BackendSuite


class TestForked(BackendSuite):
    backend = ForkedServer


class TestPipelined(BackendSuite):
    backend = HeldServer
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
            r".*SKIPPED \[1\].*'HeldServer' does not declare cancel_running.*",
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
from taskplex.conformance.provider import TestProvider
from taskplex_async import AsyncServer

class NoCluster(TestProvider):
    def options(self, workdir):
        raise BackendUnavailable("no scheduler reachable from this machine")

class TestNeedsACluster(ResultsTests):
    backend = AsyncServer
    provider = NoCluster()
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
    result.assert_outcomes(passed=4)
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
