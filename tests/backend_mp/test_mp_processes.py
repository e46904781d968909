"""Worker processes seen from outside: start methods, start failures, and no orphans.

Scenarios that need a caller process of their own (a script without a main guard, a caller killed
with SIGKILL) run a small Python script in a subprocess, bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mp_tasks
import psutil
import pytest

import taskplex
from taskplex import BackendUnavailable, InvalidOption

BOUND = 30.0
START_METHODS = ["forkserver", "spawn", "fork"]


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def run_script(path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=2 * BOUND, check=False
    )


def test_bad_options_are_refused_when_the_server_is_created() -> None:
    with pytest.raises(InvalidOption, match="start_method must be one of 'spawn'"):
        taskplex.Executor("mp", start_method="posix_spawn")
    with pytest.raises(InvalidOption, match="max_tasks_per_child must be an int >= 1"):
        taskplex.Executor("mp", max_tasks_per_child=0)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_script_without_main_guard_runs(start_method: str, tmp_path: Path) -> None:
    """Workers never import the caller's __main__, so its top-level code runs once, in the caller."""
    done = run_script(
        tmp_path / "unguarded.py",
        f"""
        import dataclasses, os
        import taskplex

        print("top-level code ran in", os.getpid())

        @dataclasses.dataclass
        class Point:
            x: int

        def moved(point):
            return Point(point.x + 1)

        with taskplex.Executor("mp", workers=2, start_method={start_method!r}) as ex:
            points = list(ex.map(moved, [Point(1), Point(2)]))
        assert all(type(p) is Point for p in points), points
        print("results", [p.x for p in points])
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("top-level code ran") == 1, done.stdout
    assert "results [2, 3]" in done.stdout


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_that_cannot_start_give_a_clear_error(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh interpreter cannot start at all without its standard library
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")
    with pytest.raises(BackendUnavailable, match=r"before it was ready|while starting") as caught:
        taskplex.Executor("mp", workers=2, start_method=start_method)
    assert "exited with code" in str(caught.value)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_workers_die_with_a_caller_killed_by_sigkill(start_method: str, tmp_path: Path) -> None:
    record = tmp_path / "workers.json"
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, time
            import taskplex

            def pid(_):
                time.sleep(0.2)  # long enough for every worker to take one
                return os.getpid()

            def hold():
                time.sleep(60)

            with taskplex.Executor("mp", workers=2, start_method={start_method!r}) as ex:
                pids = sorted(set(ex.map(pid, range(4))))
                ex.submit(hold)
                with open({str(record)!r} + ".tmp", "w") as f:
                    json.dump(pids, f)
                os.rename({str(record)!r} + ".tmp", {str(record)!r})
                time.sleep(60)
            """
        )
    )
    caller = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + BOUND
        while not record.exists():
            assert caller.poll() is None, "the caller script failed"
            assert time.monotonic() < deadline, "the caller never reported its workers"
            time.sleep(0.05)
        workers = json.loads(record.read_text())
        assert len(workers) == 2
        assert all(not gone(pid) for pid in workers)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    deadline = time.monotonic() + BOUND
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their caller"
        time.sleep(0.05)


def test_stop_leaves_no_process_behind() -> None:
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    with taskplex.Executor("mp", workers=3) as executor:
        workers = set(executor.map(mp_tasks.slow_pid, [0.1] * 6))
        started = {child.pid for child in me.children(recursive=True)} - before
        assert workers <= started
    deadline = time.monotonic() + BOUND
    while any(not gone(pid) for pid in started):
        assert time.monotonic() < deadline, f"{started} outlived the executor"
        time.sleep(0.05)


def test_max_tasks_per_child_recycles_workers() -> None:
    with taskplex.Executor("mp", workers=1, max_tasks_per_child=2) as executor:
        pids = [executor.submit(os.getpid).result(timeout=BOUND) for _ in range(6)]
        batch = list(executor.map(lambda _: os.getpid(), range(6)))
    for seen in (pids, batch):
        assert len(set(seen)) == 3, seen
        assert all(seen.count(pid) == 2 for pid in set(seen)), seen


def test_more_workers_than_the_machine_can_start_is_a_clear_error_before_anything_starts() -> None:
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ValueError, match=r"workers=100000 .*(open files|memory|process limit)"):
        taskplex.Executor("mp", workers=100_000)
    assert psutil.Process().children(recursive=True) == before, "nothing may have started"


def test_the_open_files_limit_is_named_when_it_is_what_limits() -> None:
    code = (
        "import resource, taskplex\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "try:\n"
        "    taskplex.Executor('mp', workers=50)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "open files" in result.stdout, result.stdout + result.stderr
    assert "ulimit -n" in result.stdout


def test_a_chunked_map_imports_no_scheduler_into_the_workers() -> None:
    # a worker ran the chunk helper from taskplex.executor, importing the scheduler, sqlite and
    # the plugins on its first chunk: 0.2 s per worker, a tenth of a chunked map's throughput
    with taskplex.Executor("mp", workers=1, start_method="spawn") as executor:
        loaded = list(executor.map(mp_tasks.heavy_modules_loaded, [0, 1], chunksize=2))
    assert loaded == [[], []]
