"""The mp backend under faults: results that cannot be read back, exits while pickling, arguments
that need the caller's authentication key, and what a traceback shows."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import mp_tasks
import pytest

import taskplex
from taskplex import ResultUnreadable, SerializationError, Task
from taskplex_mp.processes import START_METHODS

BOUND = 30.0


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_result_that_cannot_be_read_back_fails_its_task_once(tmp_path: Path, how: str) -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        task = Task(mp_tasks.return_unloadable, (str(tmp_path), how), retries=2)
        error = executor.submit_task(task).exception(timeout=BOUND)
        assert isinstance(error, ResultUnreadable), repr(error)
        assert task.attempts == 1, "an unreadable result would be unreadable again: not retried"
        assert mp_tasks.runs(str(tmp_path), "unloadable") == 1
        assert executor.submit(mp_tasks.shout, "still serving").result(timeout=BOUND)


class ExitsWhenPickled:
    def __reduce__(self) -> tuple[object, ...]:
        raise SystemExit(3)


def test_an_argument_that_exits_while_pickled_fails_only_that_submit() -> None:
    with taskplex.Executor("mp", workers=1) as executor:
        before = executor.submit(mp_tasks.shout, "before")
        with pytest.raises(SerializationError, match="SystemExit"):
            executor.submit(mp_tasks.accept, ExitsWhenPickled())
        after = executor.submit(mp_tasks.shout, "after")
        assert [before.result(timeout=BOUND), after.result(timeout=BOUND)] == ["before", "after"]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_manager_proxy_argument_works_under_every_start_method(start_method: str) -> None:
    with multiprocessing.Manager() as manager:
        shared = manager.list()
        with taskplex.Executor("mp", workers=1, start_method=start_method) as executor:
            assert executor.submit(mp_tasks.append_to, shared, 42).result(timeout=BOUND) == 1
        assert list(shared) == [42]


SCRIPT = """
import sys, traceback, taskplex

SETTING = 0


def read_setting():
    return SETTING


def boom(x):
    y = x + 1
    raise ValueError(f"bad {y}")


if __name__ == "__main__":
    with taskplex.Executor("mp", workers=1, start_method=sys.argv[1]) as ex:
        seen = []
        for SETTING in range(4):
            seen.append(ex.submit(read_setting).result())
        print("SWEEP", seen)
        try:
            ex.submit(boom, 1).result()
        except ValueError as exc:
            traceback.print_exception(exc, file=sys.stdout)
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_script_sees_its_globals_and_its_own_source_in_tracebacks(
    tmp_path: Path, start_method: str
) -> None:
    script = tmp_path / "sweep_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        timeout=2 * BOUND,
        check=True,
    )
    assert "SWEEP [0, 1, 2, 3]" in result.stdout, (
        "a function sent by value must see module globals as they are at each submit"
    )
    line = textwrap.dedent(SCRIPT).splitlines().index('    raise ValueError(f"bad {y}")') + 1
    assert f'File "{script}", line {line}, in boom' in result.stdout, result.stdout
    assert 'raise ValueError(f"bad {y}")' in result.stdout, result.stdout
    assert "<dynamic-code>" not in result.stdout
