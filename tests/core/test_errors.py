"""Exceptions across a real process boundary, and the error hierarchy callers rely on."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskplex import (
    DependencyFailed,
    InfrastructureError,
    JobKilled,
    RemoteTraceback,
    ResultUnreadable,
    TaskCancelled,
    TaskplexError,
    TaskTimeout,
    UnpicklableError,
    WorkerLost,
)
from taskplex.errors import ExceptionPayload, capture_exception, restore_exception


class MismatchError(Exception):
    """A user exception type that both processes can import."""


class LockHoldingError(Exception):
    """Cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoPartError(Exception):
    """Pickles, but cannot be rebuilt: pickle calls it with the one formatted argument."""

    def __init__(self, part: str, detail: str) -> None:
        super().__init__(f"{part}: {detail}")


def compare_checksums() -> None:
    try:
        int("not a number")
    except ValueError as low_level:
        raise MismatchError("checksum 17 != 42") from low_level


def hold_the_lock() -> None:
    raise LockHoldingError("the lock came along")


def split_in_two() -> None:
    raise TwoPartError("header", "truncated")


def raise_from_a_module_only_this_process_has(module_dir: str) -> None:
    Path(module_dir, "only_in_the_child.py").write_text("class OnlyHereError(Exception):\n    pass\n")
    sys.path.insert(0, module_dir)
    import only_in_the_child  # type: ignore[import-not-found]

    raise only_in_the_child.OnlyHereError("defined where it was raised")


RAISERS: dict[str, Callable[..., None]] = {
    "mismatch": compare_checksums,
    "lock": hold_the_lock,
    "two-part": split_in_two,
    "child-only": raise_from_a_module_only_this_process_has,
}


def capture_in_child(raiser: str, *args: str) -> ExceptionPayload:
    """Runs in the child process: raise, and return what the worker side would send back."""
    try:
        RAISERS[raiser](*args)
    except Exception as exc:
        return capture_exception(exc)
    raise AssertionError(f"{raiser} did not raise")


@pytest.fixture(scope="module")
def child() -> Iterator[cf.ProcessPoolExecutor]:
    """One spawned process, so that nothing is shared with this one but what is pickled."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def across(child: cf.ProcessPoolExecutor, raiser: str, *args: str) -> BaseException:
    payload = child.submit(capture_in_child, raiser, *args).result(timeout=60)
    return restore_exception(pickle.loads(pickle.dumps(payload)))


def test_user_exception_keeps_type_and_message(child: cf.ProcessPoolExecutor) -> None:
    exc = across(child, "mismatch")
    assert type(exc) is MismatchError
    assert str(exc) == "checksum 17 != 42"


def test_remote_traceback_is_chained_as_cause(child: cf.ProcessPoolExecutor) -> None:
    exc = across(child, "mismatch")
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert "compare_checksums" in text
    assert "MismatchError: checksum 17 != 42" in text
    # the exception's own chain travels as text
    assert "invalid literal for int()" in text


def test_exception_holding_a_lock_becomes_unpicklable_error(
    child: cf.ProcessPoolExecutor,
) -> None:
    exc = across(child, "lock")
    assert isinstance(exc, UnpicklableError)
    assert exc.type_name.endswith("LockHoldingError")
    assert exc.message == "the lock came along"
    assert "LockHoldingError" in str(exc)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "hold_the_lock" in str(exc.__cause__)


def test_exception_that_cannot_be_rebuilt_becomes_unpicklable_error(
    child: cf.ProcessPoolExecutor,
) -> None:
    exc = across(child, "two-part")
    assert isinstance(exc, UnpicklableError)
    assert exc.type_name.endswith("TwoPartError")
    assert exc.message == "header: truncated"
    assert "split_in_two" in str(exc.__cause__)


def test_exception_type_the_caller_cannot_import_becomes_unpicklable_error(
    child: cf.ProcessPoolExecutor, tmp_path: Path
) -> None:
    exc = across(child, "child-only", str(tmp_path))
    assert isinstance(exc, UnpicklableError)
    assert exc.type_name == "only_in_the_child.OnlyHereError"
    assert exc.message == "defined where it was raised"
    assert "raise_from_a_module_only_this_process_has" in str(exc.__cause__)


def test_unpicklable_error_itself_pickles() -> None:
    exc = UnpicklableError("pkg.Mod.Error", "went wrong")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.type_name, copy.message, str(copy)) == (
        "pkg.Mod.Error",
        "went wrong",
        "pkg.Mod.Error: went wrong",
    )


@pytest.mark.parametrize("error_type", [WorkerLost, JobKilled, ResultUnreadable, TaskTimeout])
def test_taskplex_outcome_errors_pickle(error_type: type[Exception]) -> None:
    copy = pickle.loads(pickle.dumps(error_type("worker 3 exited with signal 9")))
    assert type(copy) is error_type
    assert str(copy) == "worker 3 exited with signal 9"


def test_cancellation_is_the_standard_library_cancellation() -> None:
    assert issubclass(TaskCancelled, cf.CancelledError)
    assert issubclass(DependencyFailed, TaskCancelled)
    with pytest.raises(cf.CancelledError):
        raise DependencyFailed("dependency failed")


def test_infrastructure_errors_are_told_apart_from_user_errors() -> None:
    for error_type in (WorkerLost, JobKilled, ResultUnreadable):
        assert issubclass(error_type, InfrastructureError)
    assert issubclass(InfrastructureError, TaskplexError)
    assert not issubclass(TaskTimeout, InfrastructureError)
    assert issubclass(TaskTimeout, TimeoutError)
    assert not issubclass(TaskCancelled, InfrastructureError)
