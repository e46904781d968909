"""A client killed mid-run and run again with its journal: what its jobs did meanwhile counts (C18).

Each test runs a small Executor script in a process of its own, kills it with SIGKILL while its
jobs run, and runs it again in the same ``workdir`` with the same journal. The tasks leave a
marker file per execution (the side channel): no task may run twice, and every input must get
exactly one result.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hpc_support import BOUND, queued_job_ids, wait_until

TASKS = """
import os, time
from pathlib import Path

def gated(x, shared):
    Path(shared, f"{x}.{os.getpid()}.{time.monotonic_ns()}.ran").touch()
    deadline = time.monotonic() + 120
    while not Path(shared, "gate").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return x * 10
"""

SCRIPT = """
import json, logging, sys, taskplex
from restart_tasks import gated

workdir, journal, shared, out, log = sys.argv[1:6]
logging.basicConfig(filename=log, level=logging.INFO)
options = dict(workdir=workdir, workers=3, interval=0.1, result_grace=2.0, job_name=JOB_NAME)
kwargs = {"journal": journal} if journal else {}
with taskplex.Executor("hpc", **options, **kwargs) as executor:
    results = list(executor.map(gated, range(5), [shared] * 5))
with open(out, "w") as stream:
    json.dump(results, stream)
"""


class Run:
    """The script's files, and how to start it."""

    def __init__(self, tmp_path: Path, job_name: str, journal: bool = True) -> None:
        self.directory = tmp_path
        self.workdir = tmp_path / "work"
        self.shared = tmp_path / "shared"
        self.workdir.mkdir()
        self.shared.mkdir()
        self.out = tmp_path / "out.json"
        self.log = tmp_path / "run.log"
        self.journal = str(tmp_path / "run.db") if journal else ""
        self.job_name = job_name
        (tmp_path / "restart_tasks.py").write_text(TASKS)
        (tmp_path / "script.py").write_text(f"JOB_NAME = {job_name!r}\n" + textwrap.dedent(SCRIPT))

    def start(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "script.py", str(self.workdir), self.journal]
        command += [str(self.shared), str(self.out), str(self.log)]
        return subprocess.Popen(command, cwd=self.directory, start_new_session=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[subprocess.Popen[bytes]]:
        """The script started again; killed on the way out if the test failed before its end."""
        process = self.start()
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=BOUND)

    def open_gate_and_wait(self, process: subprocess.Popen[bytes]) -> None:
        (self.shared / "gate").touch()
        assert process.wait(timeout=2 * BOUND) == 0, self.log.read_text()

    def markers(self) -> list[int]:
        return sorted(int(path.name.split(".")[0]) for path in self.shared.glob("*.ran"))

    def kill_while_three_run(self, process: subprocess.Popen[bytes]) -> list[int]:
        """SIGKILL the client once three tasks run in their jobs; those jobs' ids."""
        wait_until(lambda: len(self.markers()) == 3, "three tasks to run")
        jobs = queued_job_ids(self.job_name)
        assert len(jobs) == 3, jobs
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=BOUND)
        return jobs

    def results_written(self) -> int:
        return len(list(self.workdir.glob("taskplex-*/*/result")))


def _finish(run: Run) -> None:
    with run.running() as second:
        assert second.wait(timeout=2 * BOUND) == 0, run.log.read_text()
    assert json.loads(run.out.read_text()) == [x * 10 for x in range(5)]
    assert run.markers() == list(range(5)), "a task ran twice, or never"
    assert queued_job_ids(run.job_name) == []
    assert list(run.workdir.iterdir()) == [], "the runs were not removed"


def test_jobs_that_finished_while_the_client_was_dead_are_collected_not_run_again(
    slurm: None, tmp_path: Path
) -> None:
    run = Run(tmp_path, "tp-restart-done")
    jobs = run.kill_while_three_run(run.start())
    (run.shared / "gate").touch()  # the three jobs finish with nobody watching
    wait_until(lambda: run.results_written() == 3, "the orphaned jobs to write their results")
    wait_until(lambda: not set(jobs) & set(queued_job_ids(run.job_name)), "the jobs to end")
    _finish(run)
    assert "3 finished task(s) to collect" in run.log.read_text()


def test_jobs_still_running_are_taken_over_by_the_next_run(slurm: None, tmp_path: Path) -> None:
    run = Run(tmp_path, "tp-restart-running")
    jobs = run.kill_while_three_run(run.start())
    with run.running() as second:
        wait_until(lambda: "took over" in run.log.read_text(), "the second run to take over")
        assert "3 job(s) still running" in run.log.read_text()
        assert sorted(queued_job_ids(run.job_name)) == sorted(jobs), "the running jobs were cancelled"
        run.open_gate_and_wait(second)
    assert json.loads(run.out.read_text()) == [x * 10 for x in range(5)]
    assert run.markers() == list(range(5)), "a task ran twice, or never"
    assert queued_job_ids(run.job_name) == []
    assert list(run.workdir.iterdir()) == [], "the runs were not removed"


def test_without_a_journal_the_next_server_cancels_the_jobs_of_a_dead_one(
    slurm: None, tmp_path: Path
) -> None:
    run = Run(tmp_path, "tp-restart-orphans", journal=False)
    jobs = run.kill_while_three_run(run.start())
    assert sorted(queued_job_ids(run.job_name)) == sorted(jobs)
    with run.running() as second:
        # nothing can ask for the orphans' results: they are cancelled, not left to run
        wait_until(lambda: not set(jobs) & set(queued_job_ids(run.job_name)), "the orphans to go")
        run.open_gate_and_wait(second)
    assert "3 job(s) cancelled" in run.log.read_text()
    assert json.loads(run.out.read_text()) == [x * 10 for x in range(5)]
    assert list(run.workdir.iterdir()) == [], "the runs were not removed"


@pytest.fixture(autouse=True)
def _no_jobs_left(slurm: None) -> object:
    yield
    for prefix in ("tp-restart-",):
        leftover = queued_job_ids(prefix)
        if leftover:
            subprocess.run(["scancel", *map(str, leftover)], timeout=30, check=False)
