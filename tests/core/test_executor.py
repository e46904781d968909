"""Executor: a concurrent.futures.Executor over any backend, with the standard library's semantics."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskplex
from taskplex import (
    DuplicateTaskName,
    Executor,
    InvalidOption,
    ResourceUnavailable,
    Task,
    TaskFuture,
    TaskServer,
    TaskTimeout,
    UnknownBackend,
)
from taskplex.backend import Attempt, BackendContext, CoroutineBackend
from taskplex_async import AsyncServer

BOUND = 30.0
"""Seconds a test waits for something that should happen, so that it fails instead of hanging."""


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def square(x: int) -> int:
    return x * x


def touch(path: Path) -> None:
    path.touch()


class Gate:
    """Holds the tasks that pass through it until the test opens it."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.arrived = threading.Semaphore(0)

    def pass_through(self, value: Any = None) -> Any:
        self.arrived.release()
        self.opened.wait(BOUND)
        return value

    def wait_for_arrival(self) -> None:
        assert self.arrived.acquire(timeout=BOUND), "no task reached the gate"


def test_is_a_concurrent_futures_executor() -> None:
    with Executor("async") as executor:
        assert isinstance(executor, cf.Executor)
        future = executor.submit(square, 7)
        assert isinstance(future, cf.Future)
        assert isinstance(future, TaskFuture)
        assert future.result(timeout=BOUND) == 49
        assert future.task.result == 49


def test_map_returns_results_in_submission_order() -> None:
    def slower_first(x: int) -> int:
        time.sleep(0.001 * (10 - x))
        return x

    with Executor("async", workers=4) as executor:
        assert list(executor.map(slower_first, range(10), timeout=BOUND)) == list(range(10))
        assert list(executor.map(pow, [2, 3], [5, 2])) == [32, 9]


def test_map_raises_the_first_failure_when_reached() -> None:
    def invert(x: int) -> float:
        return 1 / x

    with Executor("async") as executor:
        results = executor.map(invert, [1, 0, 2])
        assert next(results) == 1
        with pytest.raises(ZeroDivisionError):
            next(results)


@pytest.mark.parametrize("chunksize", [2, 3, 64])
def test_chunked_map_keeps_order_and_runs_fewer_tasks(chunksize: int) -> None:
    with Executor("async", workers=2) as executor:
        assert list(executor.map(pow, range(10), [2] * 10, chunksize=chunksize)) == [
            x**2 for x in range(10)
        ]
        assert list(executor.map(pow, [], chunksize=chunksize)) == []
        assert executor.server.stats.submitted == -(-10 // chunksize)


def test_chunked_map_fails_the_chunk_holding_the_failure() -> None:
    def invert(x: int) -> float:
        return 1 / x

    with Executor("async", workers=2) as executor:
        results = executor.map(invert, [1, 2, 3, 0, 5, 6], chunksize=3)
        assert [next(results) for _ in range(3)] == [1, 0.5, 1 / 3]
        with pytest.raises(ZeroDivisionError):
            next(results)


@pytest.mark.parametrize("chunksize", [0, -1, 1.5, True])
def test_bad_chunksize_is_rejected(chunksize: Any) -> None:
    with Executor("async") as executor, pytest.raises(ValueError, match="chunksize"):
        executor.map(abs, [1], chunksize=chunksize)


def test_exceptions_keep_their_type() -> None:
    class SimulationDiverged(Exception):
        pass

    def diverge() -> None:
        raise SimulationDiverged("residual grew past 1e12")

    with Executor("async") as executor:
        future = executor.submit(diverge)
        with pytest.raises(SimulationDiverged, match="residual grew"):
            future.result(timeout=BOUND)
        assert executor.submit(square, 3).result(timeout=BOUND) == 9, "the executor goes on"


def test_submit_after_shutdown_is_a_runtime_error() -> None:
    executor = Executor("async")
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 2)


def test_shutdown_is_idempotent() -> None:
    executor = Executor("async")
    future = executor.submit(square, 2)
    executor.shutdown(wait=True)
    executor.shutdown(wait=True)
    executor.shutdown(wait=False, cancel_futures=True)
    assert future.result(timeout=0) == 4


def test_context_manager_waits_for_submitted_work() -> None:
    gate = Gate()
    with Executor("async", workers=2) as executor:
        futures = [executor.submit(gate.pass_through, n) for n in range(4)]
        gate.wait_for_arrival()
        gate.opened.set()
    assert all(future.done() for future in futures)
    assert [future.result(timeout=0) for future in futures] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)


def test_shutdown_with_cancel_futures_cancels_what_has_not_started(tmp_path: Path) -> None:
    gate = Gate()
    executor = Executor("async", workers=1)
    running = executor.submit(gate.pass_through, "ran")
    gate.wait_for_arrival()
    queued = [executor.submit(touch, tmp_path / f"queued-{n}") for n in range(3)]
    executor.shutdown(wait=False, cancel_futures=True)
    wait_until(lambda: all(future.cancelled() for future in queued))
    gate.opened.set()
    executor.shutdown(wait=True)
    assert running.result(timeout=0) == "ran"
    assert list(tmp_path.iterdir()) == [], "cancelled tasks never ran"
    done, not_done = cf.wait([running, *queued], timeout=BOUND)
    assert not not_done
    assert len(done) == 4


def test_a_cancel_the_loop_delivers_first_is_still_seen_by_wait(tmp_path: Path) -> None:
    # The loop may deliver the cancelled task (and move its future on to
    # CANCELLED_AND_NOTIFIED) before Future.cancel() in the caller's thread has recorded the
    # cancel; recording it then must not move the future back, or wait() never counts it done.
    # The loop's delivery is made to come first here by holding the caller's thread until then.
    gate = Gate()
    with Executor("async", workers=1) as executor:
        running = executor.submit(gate.pass_through, "ran")
        gate.wait_for_arrival()
        queued = executor.submit(touch, tmp_path / "queued")
        server = executor.server
        cancel_task = server.cancel_task

        def cancel_then_let_the_loop_deliver(task: Any, **options: Any) -> bool:
            cancelled = cancel_task(task, **options)
            wait_until(lambda: queued._state == "CANCELLED_AND_NOTIFIED")
            return cancelled

        server.cancel_task = cancel_then_let_the_loop_deliver  # type: ignore[method-assign]
        try:
            assert queued.cancel() is True
        finally:
            del server.cancel_task
        done, not_done = cf.wait([queued], timeout=BOUND)
        gate.opened.set()
    assert (done, not_done) == ({queued}, set())
    assert running.result(timeout=0) == "ran"


def test_wait_and_as_completed_see_cancelled_futures(tmp_path: Path) -> None:
    gate = Gate()
    with Executor("async", workers=1) as executor:
        running = executor.submit(gate.pass_through, "ran")
        gate.wait_for_arrival()
        queued = executor.submit(touch, tmp_path / "queued")
        assert queued.cancel() is True
        done, not_done = cf.wait([queued], timeout=BOUND)
        assert done == {queued}
        assert not not_done
        gate.opened.set()
        completed = list(cf.as_completed([running, queued], timeout=BOUND))
    assert set(completed) == {running, queued}
    assert queued.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result(timeout=0)
    assert not (tmp_path / "queued").exists()


def test_cancelling_a_future_before_it_starts_prevents_execution(tmp_path: Path) -> None:
    gate = Gate()
    with Executor("async", workers=1) as executor:
        executor.submit(gate.pass_through)
        gate.wait_for_arrival()
        futures = [executor.submit(touch, tmp_path / f"marker-{n}") for n in range(5)]
        cancelled = futures[1::2]
        for future in cancelled:
            assert future.cancel() is True
        gate.opened.set()
        for future in futures:
            if future not in cancelled:
                future.result(timeout=BOUND)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "marker-0",
        "marker-2",
        "marker-4",
    ]
    assert all(future.task.cancelled() for future in cancelled)  # type: ignore[attr-defined]


def test_cancelling_a_future_that_started_fails_like_the_standard_library() -> None:
    gate = Gate()
    with Executor("async") as executor:
        future = executor.submit(gate.pass_through, "ran")
        gate.wait_for_arrival()
        assert future.running()
        assert future.cancel() is False
        gate.opened.set()
        assert future.result(timeout=BOUND) == "ran"


def test_submit_task_applies_its_timeout() -> None:
    with Executor("async") as executor:
        future = executor.submit_task(Task(asyncio.sleep, (BOUND,), timeout=0.05))
        error = future.exception(timeout=BOUND)
    assert isinstance(error, TaskTimeout)
    assert isinstance(error, TimeoutError)


def test_submitting_from_inside_a_running_task() -> None:
    with Executor("async", workers=2) as executor:

        def fan_out(n: int) -> int:
            return sum(executor.submit(square, i).result(timeout=BOUND) for i in range(n))

        assert executor.submit(fan_out, 4).result(timeout=BOUND) == 0 + 1 + 4 + 9


def test_bounded_queue_makes_submit_block_until_there_is_room() -> None:
    gate = Gate()
    with Executor("async", workers=1, queue_size=1) as executor:
        first = executor.submit(gate.pass_through, 1)
        gate.wait_for_arrival()
        second = executor.submit(square, 2)
        submitted: list[cf.Future[int]] = []
        third_submitter = threading.Thread(target=lambda: submitted.append(executor.submit(square, 3)))
        third_submitter.start()
        third_submitter.join(0.1)
        assert third_submitter.is_alive(), "submit blocks while the queue is full"
        gate.opened.set()
        third_submitter.join(BOUND)
        assert not third_submitter.is_alive()
        assert [f.result(timeout=BOUND) for f in (first, second, *submitted)] == [1, 4, 9]


# ------------------------------------------------------------------------------ errors at submit


def test_unknown_backend_lists_the_installed_ones_and_what_is_published() -> None:
    with pytest.raises(UnknownBackend) as info:
        Executor("slurmish")
    message = str(info.value)
    assert "'slurmish'" in message
    assert "installed: async" in message
    assert "hpc (taskplex-backend-hpc)" in message, "points to the backends this project publishes"
    assert "taskplex-backend-slurmish" not in message, "never a guessed package name"


def test_misspelt_backend_gets_a_did_you_mean() -> None:
    with pytest.raises(UnknownBackend, match="Did you mean 'mp'"):
        Executor("mpp")


def test_published_backend_that_is_not_installed_names_its_distribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskplex import plugins

    # every backend of this repository is installed in its test environment: publish one more
    monkeypatch.setitem(plugins.PUBLISHED_BACKENDS, "nowhere", "taskplex-backend-nowhere")
    with pytest.raises(UnknownBackend, match=r"`pip install taskplex-backend-nowhere`"):
        Executor("nowhere")


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(InvalidOption) as info:
        Executor("async", wrokers=4)
    message = str(info.value)
    assert "'wrokers'" in message
    assert "workers" in message.split("valid options are")[1]
    assert "queue_size" in message


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"workers": 0}, "workers must be an int >= 1, got 0"),
        ({"workers": "4"}, "workers must be an int >= 1, got '4'"),
        ({"queue_size": -1}, "queue_size must be an int >= 0"),
    ],
)
def test_bad_option_values_are_rejected(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(InvalidOption, match=complaint):
        Executor("async", **options)


def test_options_with_a_server_object_are_rejected() -> None:
    with pytest.raises(TypeError, match="pass options when creating the server"):
        Executor(AsyncServer(), workers=2)


def test_bad_task_is_rejected_at_the_call_site() -> None:
    with Executor("async", workers=2) as executor:
        with pytest.raises(InvalidOption, match="needs a callable"):
            executor.submit(42)  # type: ignore[arg-type]
        with pytest.raises(ResourceUnavailable, match="gpus"):
            executor.submit_task(Task(square, (1,), resources={"gpus": 1}))
        executor.submit_task(Task(square, (2,), name="only-one"))
        with pytest.raises(DuplicateTaskName, match="only-one"):
            executor.submit_task(Task(square, (3,), name="only-one"))
        assert executor.submit(square, 5).result(timeout=BOUND) == 25


def test_a_server_object_or_class_may_be_given() -> None:
    with Executor(AsyncServer(workers=2)) as executor:
        assert executor.server.workers == 2
        assert executor.submit(square, 4).result(timeout=BOUND) == 16
    with Executor(AsyncServer, workers=3) as executor:
        assert executor.server.workers == 3
        assert executor.submit(square, 5).result(timeout=BOUND) == 25


class RefusingBackend(CoroutineBackend):
    """A backend whose workers cannot be brought up."""

    async def start(self, context: BackendContext) -> None:
        raise taskplex.BackendUnavailable("no scheduler reachable from this machine")

    async def execute(self, attempt: Attempt) -> None:
        raise AssertionError("never started")


def test_a_server_that_cannot_start_fails_the_constructor() -> None:
    before = set(threading.enumerate())
    with pytest.raises(taskplex.BackendUnavailable, match="no scheduler reachable"):
        Executor(TaskServer(RefusingBackend()))
    assert set(threading.enumerate()) == before


# ------------------------------------------------------------------------------ threads


def test_no_thread_is_left_behind_after_shutdown() -> None:
    before = set(threading.enumerate())
    with Executor("async", workers=4) as executor:
        assert list(executor.map(square, range(20))) == [x * x for x in range(20)]
        assert set(threading.enumerate()) - before, "the executor runs its own threads"
    assert set(threading.enumerate()) == before


def test_no_thread_is_left_behind_after_cancel_futures() -> None:
    before = set(threading.enumerate())
    gate = Gate()
    executor = Executor("async", workers=2)
    for n in range(6):
        executor.submit(gate.pass_through, n)
    gate.wait_for_arrival()
    gate.opened.set()
    executor.shutdown(wait=True, cancel_futures=True)
    assert set(threading.enumerate()) == before


# ------------------------------------------------------------------------------ callbacks, map


def test_a_done_callback_waiting_for_another_future_does_not_stall_the_executor() -> None:
    gate = Gate()
    seen: list[Any] = []
    with Executor("async", workers=2) as executor:
        later = executor.submit(gate.pass_through, "later")
        first = executor.submit(square, 3)
        first.add_done_callback(lambda _: seen.append(later.result(timeout=BOUND)))
        gate.wait_for_arrival()
        quick = executor.submit(square, 4)
        assert quick.result(timeout=5) == 16, "the executor stalled behind a blocking callback"
        gate.opened.set()
        wait_until(lambda: seen == ["later"])


def test_chunked_map_awaits_a_coroutine_function() -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    with Executor("async", workers=2) as executor:
        assert list(executor.map(double, range(10), chunksize=3)) == [2 * x for x in range(10)]


def test_waiting_for_a_future_on_the_executors_own_loop_fails_at_once() -> None:
    async def waits_blocking(executor: Executor) -> Any:
        return executor.submit(square, 2).result(timeout=BOUND)

    with Executor("async", workers=2) as executor, pytest.raises(RuntimeError, match="would deadlock"):
        executor.submit(waits_blocking, executor).result(timeout=BOUND)


def test_a_dropped_executor_finishes_its_work_and_releases_its_threads() -> None:
    before = set(threading.enumerate())
    executor = Executor("async", workers=2)
    future = executor.submit(square, 6)
    del executor
    gc.collect()
    assert future.result(timeout=BOUND) == 36
    wait_until(lambda: set(threading.enumerate()) == before)


# ------------------------------------------------------------------------------ drop-in behaviour


def fail_now() -> None:
    raise ValueError("head of the chain")


def test_a_failed_head_cancels_a_chain_of_ten_thousand_and_shutdown_is_normal() -> None:
    with Executor("async", workers=2) as executor:
        head = executor.submit_task(Task(fail_now))
        tasks = [head.task]
        for _ in range(10_000):
            tasks.append(executor.submit_task(Task(abs, (-1,), depends_on=[tasks[-1]])).task)
    assert tasks[0].status is taskplex.TaskStatus.FAILED
    assert all(task.status is taskplex.TaskStatus.CANCELLED for task in tasks[1:])
    last = tasks[-1].exception
    assert isinstance(last, taskplex.DependencyFailed)
    assert "head of the chain" in str(last.__cause__), "the error names why the chain failed"
    assert len(str(last)) < 1000, "the message does not grow with the chain"


@pytest.mark.parametrize("backend", ["async", "mp"])
def test_bad_worker_counts_raise_value_error_with_a_message(backend: str) -> None:
    for workers in (0, -1):
        with pytest.raises(ValueError, match=f"workers must be an int >= 1, got {workers}"):
            Executor(backend, workers=workers)


@pytest.mark.parametrize("backend", ["mp", "thread"])
def test_a_coroutine_function_is_refused_where_coroutines_do_not_run(backend: str) -> None:
    async def fetch() -> int:
        return 1

    with Executor(backend, workers=1) as executor:
        with pytest.raises(InvalidOption, match=r"coroutine function.*run coroutines: async"):
            executor.submit(fetch)
        assert executor.submit(square, 3).result(timeout=BOUND) == 9


# an interrupt that lands inside a weakref callback is printed and dropped by Python itself
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("backend", ["async", "mp"])
def test_interrupts_landing_anywhere_in_submit_and_map_lose_nothing(backend: str) -> None:
    """Ctrl-C at any point inside submit() or map(): every submission ends, none stays pending."""

    armed = [False]

    def interrupt(signum: int, frame: Any) -> None:
        if armed[0]:  # only inside submit() and map(), and once per arming
            armed[0] = False
            raise KeyboardInterrupt

    futures: list[cf.Future[Any]] = []
    interrupted = 0
    previous = signal.signal(signal.SIGALRM, interrupt)
    executor = Executor(backend, workers=2)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                armed[0] = True
                futures.append(executor.submit(abs, -len(futures)))
                futures.extend(executor.map(abs, range(-3, 0)))  # consumes results too
                armed[0] = False
            except KeyboardInterrupt:
                interrupted += 1
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 10, "the test did not interrupt submit often enough to mean anything"
    done = threading.Thread(target=executor.shutdown)
    done.start()
    done.join(BOUND)
    assert not done.is_alive(), "an interrupted submit left a task pending forever"
    after = Executor(backend, workers=1)
    assert after.submit(abs, -5).result(timeout=BOUND) == 5
    after.shutdown()
    for future in futures:
        if isinstance(future, cf.Future):
            assert future.done()


INTERRUPTED_SCRIPT = """
import os, signal, sys, time, taskplex

# Ctrl-C raises KeyboardInterrupt as on a terminal, also when the tests run in a background job
# (a shell without job control starts those with SIGINT ignored, and Python keeps it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

def hold(directory):
    open(os.path.join(directory, "started"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(directory, "release")):
        if time.monotonic() > deadline:
            return "never released"
        time.sleep(0.01)
    return "released"

if __name__ == "__main__":
    with taskplex.Executor(sys.argv[1], workers=1) as ex:
        running = ex.submit(hold, sys.argv[2])
        queued = ex.submit(hold, sys.argv[2] + "-never")
        while not os.path.exists(os.path.join(sys.argv[2], "started")):
            time.sleep(0.01)
        print("ready", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("backend", ["async", "mp"])
def test_a_first_ctrl_c_says_what_is_waited_for_and_a_second_cancels_it(
    backend: str, tmp_path: Path
) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), backend, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        wait_until((tmp_path / "started").exists)
        time.sleep(0.5)
        assert process.poll() is None, "the first Ctrl-C waits for the running task"
        if backend == "mp":
            process.send_signal(signal.SIGINT)  # the second one cancels it
        else:
            (tmp_path / "release").touch()  # a thread cannot be cancelled: let it end
        _, stderr = process.communicate(timeout=BOUND)
    finally:
        process.kill()
    assert "waiting for 1 running task(s)" in stderr, stderr
    assert "Press Ctrl-C again to cancel" in stderr
    assert process.returncode != 0
    assert not (tmp_path.parent / f"{tmp_path.name}-never" / "started").exists()


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_draws_a_bar_of_finished_calls_when_asked(
    chunksize: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with taskplex.Executor("mp", workers=2) as executor:
        results = list(executor.map(square, range(7), chunksize=chunksize, progress="squares"))
        assert results == [x * x for x in range(7)]
        drawn = capsys.readouterr().err
        assert "squares" in drawn
        assert "7/7" in drawn, f"the bar did not end at every call finished:\n{drawn}"
        assert "8/7" not in drawn
        assert list(executor.map(square, range(7), chunksize=chunksize)) == results
        assert "7/7" not in capsys.readouterr().err, "a bar was drawn without progress="
