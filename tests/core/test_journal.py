"""The restart journal and task keys: a re-run does exactly what is left, never a wrong result."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import taskplex
from taskplex import Task
from taskplex.errors import JournalError, UnstableKey
from taskplex.journal import FORMAT, Journal
from taskplex.keys import task_key

BOUND = 60.0

# ---------------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------------


def _function_from(source: str, namespace: dict[str, Any] | None = None) -> Any:
    namespace = {"__name__": "sweep_module"} if namespace is None else namespace
    exec(compile(textwrap.dedent(source), "<sweep>", "exec"), namespace)
    return namespace["simulate"]


def test_editing_the_function_or_what_it_calls_changes_the_key() -> None:
    base = _function_from(
        """
        def helper(x):
            return x + 1
        def simulate(x):
            return helper(x) * 2
        """
    )
    same = _function_from(
        """
        # a comment above moves every line down: the key stays
        def helper(x):
            return x + 1
        def simulate(x):
            return helper(x) * 2
        """
    )
    helper_edited = _function_from(
        """
        def helper(x):
            return x + 2
        def simulate(x):
            return helper(x) * 2
        """
    )
    keys = [task_key(Task(f, (1,))) for f in (base, same, helper_edited)]
    assert keys[0] == keys[1]
    assert keys[0] != keys[2], "editing a function the task calls by value must change the key"
    assert task_key(Task(base, (1,))) != task_key(Task(base, (2,)))


def test_a_module_setting_read_by_the_function_is_part_of_the_key() -> None:
    namespace: dict[str, Any] = {"__name__": "sweep_module", "SCALE": 3}
    simulate = _function_from("def simulate(x):\n    return x * SCALE\n", namespace)
    three = task_key(Task(simulate, (1,)))
    namespace["SCALE"] = 4
    assert task_key(Task(simulate, (1,))) != three
    namespace["SCALE"] = 3
    assert task_key(Task(simulate, (1,))) == three


def test_keys_do_not_depend_on_hash_randomisation() -> None:
    program = (
        "from taskplex import Task\nfrom taskplex.keys import task_key\n"
        "print(task_key(Task(sorted, ({'b', 'a', 'c', 'd'},), kwargs={'reverse': False})))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", program],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=BOUND,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1, keys


def test_an_argument_that_cannot_be_encoded_is_a_clear_error() -> None:
    with pytest.raises(UnstableKey, match=r"cannot compute a journal key .*name= or key="):
        task_key(Task(print, (threading.Lock(),)))
    assert task_key(Task(print, (threading.Lock(),), name="lock-1")) == "name:lock-1"
    assert task_key(Task(print, (threading.Lock(),), key="mine")) == "mine"


def test_submit_with_a_journal_refuses_an_unkeyable_task(tmp_path: Path) -> None:
    with taskplex.Executor("async", journal=tmp_path / "run.db") as executor:
        with pytest.raises(UnstableKey):
            executor.submit(str, threading.Lock())
        assert executor.submit(str, 5).result(timeout=BOUND) == "5"


# ---------------------------------------------------------------------------------------------------
# restoring
# ---------------------------------------------------------------------------------------------------


def counted(folder: str, x: int) -> int:
    (Path(folder) / f"{x}.{time.monotonic_ns()}").touch()
    return x * x


def counted_failure(folder: str, x: int) -> int:
    (Path(folder) / f"{x}.{time.monotonic_ns()}").touch()
    raise ValueError(f"x={x} is bad")


def runs(folder: Path, x: int) -> int:
    return len(list(folder.glob(f"{x}.*")))


@pytest.mark.parametrize("backend", ["async", "mp"])
def test_finished_tasks_are_restored_not_run(backend: str, tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    journal = tmp_path / "run.db"
    with taskplex.Executor(backend, workers=2, journal=journal) as executor:
        assert list(executor.map(counted, [str(folder)] * 4, range(4))) == [0, 1, 4, 9]
    with taskplex.Executor(backend, workers=2, journal=journal) as executor:
        futures = [executor.submit(counted, str(folder), x) for x in range(6)]
        assert [f.result(timeout=BOUND) for f in futures] == [0, 1, 4, 9, 16, 25]
    assert [runs(folder, x) for x in range(6)] == [1] * 6


def test_failed_tasks_run_again_unless_asked_to_restore_them(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    path = tmp_path / "run.db"
    for expected_runs in (1, 2):
        with (
            taskplex.Executor("async", journal=path) as executor,
            pytest.raises(ValueError, match="x=7 is bad"),
        ):
            executor.submit(counted_failure, str(folder), 7).result(timeout=BOUND)
        assert runs(folder, 7) == expected_runs
    journal = Journal(path, rerun_failed=False)
    with taskplex.Executor("async", journal=journal) as executor:
        future = executor.submit(counted_failure, str(folder), 7)
        with pytest.raises(ValueError, match="x=7 is bad"):
            future.result(timeout=BOUND)
    assert runs(folder, 7) == 2, "a restored failure ran again"


def test_a_result_that_cannot_be_read_back_runs_its_task_again(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    path = tmp_path / "run.db"
    with taskplex.Executor("async", journal=path) as executor:
        assert executor.submit(counted, str(folder), 3).result(timeout=BOUND) == 9
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE outcomes SET value = x'00ff00'")
    with taskplex.Executor("async", journal=path) as executor:
        assert executor.submit(counted, str(folder), 3).result(timeout=BOUND) == 9
    assert runs(folder, 3) == 2


def test_servers_take_a_journal_too(tmp_path: Path) -> None:
    import asyncio

    from taskplex import ResultsQueue
    from taskplex_async import AsyncServer

    folder = tmp_path / "runs"
    folder.mkdir()

    async def one_run() -> list[Any]:
        server = AsyncServer(workers=2)
        server.journal = tmp_path / "run.db"
        results = ResultsQueue()
        async with asyncio.TaskGroup() as group:
            await server.start(group)
            for x in range(3):
                await server.submit(
                    Task(counted, (str(folder), x), name=f"point-{x}", results_queue=results)
                )
            done = [await results.get() for _ in range(3)]
            await server.stop(wait=True)
        return sorted((task.name, task.result, task.worker) for task in done)

    first = asyncio.run(one_run())
    second = asyncio.run(one_run())
    assert [r[:2] for r in first] == [r[:2] for r in second]
    assert {r[2] for r in second} == {"journal"}
    assert [runs(folder, x) for x in range(3)] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# files that are not a usable journal
# ---------------------------------------------------------------------------------------------------


def test_files_that_are_not_a_journal_are_refused_clearly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(JournalError, match="not a taskplex journal or is corrupt"):
        Journal(garbage)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE things (x)")
    with pytest.raises(JournalError, match="another program"):
        Journal(foreign)
    newer = tmp_path / "newer.db"
    Journal(newer).close()
    with sqlite3.connect(newer) as connection:
        connection.execute(f"PRAGMA user_version = {FORMAT + 1}")
    with pytest.raises(JournalError, match="newer taskplex"):
        Journal(newer)
    with pytest.raises(JournalError, match="is a directory"):
        Journal(tmp_path)
    with pytest.raises(JournalError):
        taskplex.Executor("async", journal=garbage)


def test_two_processes_write_one_journal_at_once(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""
        import sys, taskplex
        with taskplex.Executor("async", workers=4, journal={str(tmp_path / "run.db")!r}) as ex:
            start = int(sys.argv[1])
            print(sum(ex.map(abs, range(start, start + 500))))
        """
    )
    processes = [subprocess.Popen([sys.executable, "-c", program, str(start)]) for start in (0, 500)]
    assert [p.wait(timeout=BOUND) for p in processes] == [0, 0]
    journal = Journal(tmp_path / "run.db")
    assert len(journal) == 1000
    journal.close()


# ---------------------------------------------------------------------------------------------------
# a real restore after SIGKILL (C18), and `taskplex journal show`
# ---------------------------------------------------------------------------------------------------

TASKS = """
import os, time
from pathlib import Path

def mark(x, folder):
    Path(folder, f"{x}.{os.getpid()}.{time.monotonic_ns()}").touch()
    time.sleep(0.02)
    return x * 10
"""

SCRIPT = """
import json, sys, taskplex
from tasks import mark
folder, journal, out = sys.argv[1:4]
with taskplex.Executor("mp", workers=2, journal=journal) as ex:
    results = list(ex.map(mark, range(200), [folder] * 200))
with open(out, "w") as f:
    json.dump(results, f)
"""


def _recorded(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1) as connection:
            return int(connection.execute("SELECT count(*) FROM outcomes").fetchone()[0])
    except sqlite3.Error:
        return 0


def _kill_when_recorded(process: subprocess.Popen[Any], journal: Path, count: int) -> set[int]:
    """SIGKILL ``process`` once ``count`` outcomes are on disk; the inputs recorded by then."""
    deadline = time.monotonic() + BOUND
    while _recorded(journal) < count:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the journal did not fill in time"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=BOUND)
    with sqlite3.connect(journal) as connection:
        # each result is its input times ten
        return {pickle.loads(row[0]) // 10 for row in connection.execute("SELECT value FROM outcomes")}


def _runs_per_input(folder: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in folder.iterdir():
        x = int(path.name.split(".")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts


@pytest.mark.parametrize("how", ["executor", "taskplex map"])
def test_a_run_killed_midway_and_run_again_does_only_what_was_left(how: str, tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "in.jsonl").write_text(
        "".join(f"[{x}, {json.dumps(str(tmp_path / 'runs'))}]\n" for x in range(200))
    )
    folder = tmp_path / "runs"
    folder.mkdir()
    journal = tmp_path / "run.db"
    out = tmp_path / "out.json"
    if how == "executor":
        command = [sys.executable, "script.py", str(folder), str(journal), str(out)]
    else:
        command = [
            sys.executable, "-m", "taskplex.cli", "map", "tasks:mark", "--inputs", "in.jsonl",
            "--output", str(out), "--backend", "mp", "--workers", "2", "--journal", str(journal),
        ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True)
    recorded = _kill_when_recorded(first, journal, 40)
    assert len(recorded) >= 40
    second = subprocess.run(command, cwd=tmp_path, env=env, timeout=BOUND * 2, check=False)
    assert second.returncode == 0
    runs = _runs_per_input(folder)
    assert sorted(runs) == list(range(200)), "some inputs never ran"
    ran_again = sorted(x for x in recorded if runs[x] != 1)
    assert ran_again == [], f"tasks recorded as finished before the kill ran again: {ran_again}"
    if how == "executor":
        assert json.loads(out.read_text()) == [x * 10 for x in range(200)]
    else:
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["result"] for r in records] == [x * 10 for x in range(200)]
        assert [r["index"] for r in records] == list(range(200))
    show = subprocess.run(
        [sys.executable, "-m", "taskplex.cli", "journal", "show", str(journal)],
        capture_output=True, text=True, timeout=BOUND, check=True,
    )  # fmt: skip
    assert show.stdout.startswith(f"{journal}: 200 outcome(s), 200 succeeded, 0 failed")
