"""Never hangs, never loses a task: a restarted slurmctld, a hanging squeue, a pending job
cancelled, and one squeue per poll however many jobs there are."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import hpc_tasks
import pytest
from hpc_support import BOUND, MakeExecutor, alive, queued_job_ids, run, wait_until

from taskplex import TaskStatus

ROOT = Path(__file__).resolve().parents[2]
SETUP_SLURM = ROOT / ".ci" / "setup-slurm"
CONTROLLER_PID = Path("/run/slurmctld.pid")


def test_slurmctld_restarted_mid_run_loses_no_task(make_executor: MakeExecutor, shared: Path) -> None:
    assert SETUP_SLURM.exists(), f"{SETUP_SLURM} restarts the controller in this test"
    executor = make_executor(workers=4, command_timeout=5.0)
    running = [executor.submit(hpc_tasks.hold, str(shared), f"r{i}") for i in range(3)]
    for i in range(3):
        wait_until((shared / f"r{i}.started").exists, f"r{i} to start")
    pid = int(CONTROLLER_PID.read_text().strip())
    os.kill(pid, signal.SIGTERM)  # an administrator's restart: the controller saves its state
    try:
        wait_until(lambda: not alive(pid), "slurmctld to die")
        # submitted while there is no controller: sbatch fails, and is tried again later
        later = [executor.submit(hpc_tasks.record_run, str(shared), f"l{i}") for i in range(3)]
        for i in range(3):
            (shared / f"r{i}.release").touch()
        # the running jobs' results are files: they arrive without a controller
        wait_until(lambda: all(future.done() for future in running), "results without a controller")
    finally:
        subprocess.run(["bash", str(SETUP_SLURM)], check=True, timeout=300, capture_output=True)
    assert [future.result(BOUND) for future in running] == ["r0", "r1", "r2"]
    assert [future.result(BOUND) for future in later] == [1, 1, 1]
    for i in range(3):
        assert not (shared / f"r{i}.run2").exists(), f"r{i} ran twice"
        assert not (shared / f"l{i}.run2").exists(), f"l{i} ran twice"


def test_a_hanging_squeue_does_not_wedge_the_server(
    make_executor: MakeExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    squeue = fake / "squeue"
    squeue.write_text("#!/bin/sh\nexec sleep 600\n")
    squeue.chmod(0o755)
    real_path = os.environ["PATH"]
    executor = make_executor(command_timeout=1.0, workers=3)
    monkeypatch.setenv("PATH", f"{fake}:{real_path}")
    try:
        futures = [executor.submit(abs, -i) for i in range(3)]
        assert [future.result(BOUND) for future in futures] == [0, 1, 2]
    finally:
        monkeypatch.setenv("PATH", real_path)


def test_cancelling_a_pending_job_withdraws_it(make_executor: MakeExecutor, shared: Path) -> None:
    cpus = max(int(n) for n in run(["sinfo", "-N", "--noheader", "-o", "%c"]).split())
    blocker = run(
        ["sbatch", "--parsable", "-c", str(cpus), "-t", "2", "-o", "/dev/null", "--wrap", "sleep 120"]
    )
    blocker_id = blocker.strip().split(";")[0]
    try:
        wait_until(
            lambda: run(["squeue", "--noheader", "-j", blocker_id, "-o", "%T"]).strip() == "RUNNING",
            "the node to be full",
        )
        executor = make_executor(job_name="tppend")
        future = executor.submit(hpc_tasks.hold, str(shared), "never")
        wait_until(lambda: queued_job_ids("tppend") != [], "the job to be queued")
        assert future.task.status is TaskStatus.QUEUED
        assert future.cancel() is True
        wait_until(lambda: queued_job_ids("tppend") == [], "the pending job to be cancelled")
    finally:
        run(["scancel", blocker_id])
    assert future.cancelled()
    assert not (shared / "never.started").exists()


def test_one_squeue_per_poll_whatever_the_number_of_jobs(
    make_executor: MakeExecutor, shared: Path
) -> None:
    executor = make_executor(workers=6)
    backend = executor.server.backend
    futures = [executor.submit(hpc_tasks.hold, str(shared), f"t{i}") for i in range(6)]
    for i in range(6):
        wait_until((shared / f"t{i}.started").exists, f"t{i} to start")
    polls_before, calls_before = backend.polls, backend.scheduler_calls.get("squeue", 0)
    wait_until(lambda: backend.polls >= polls_before + 10, "ten polls")
    polls = backend.polls - polls_before
    calls = backend.scheduler_calls.get("squeue", 0) - calls_before
    assert calls <= polls + 1, f"{calls} squeue calls in {polls} polls of 6 running jobs"
    for i in range(6):
        (shared / f"t{i}.release").touch()
    assert [future.result(BOUND) for future in futures] == [f"t{i}" for i in range(6)]


@pytest.mark.parametrize("pack", [False, True], ids=["job", "pilot"])
def test_the_guard_stops_work_on_another_host_without_scancel(
    make_executor: MakeExecutor,
    shared: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pack: bool,
) -> None:
    # scancel does nothing, and the server believes the job runs elsewhere: only the job's
    # guard (packed: its pilot), watching for the abort file, can stop the work
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scancel").write_text("#!/bin/sh\nexit 0\n")
    (fake / "scancel").chmod(0o755)
    executor = make_executor(pack=pack, job_name="tpguard")
    monkeypatch.setattr(executor.server.backend, "_host", "a-compute-node-elsewhere")
    future = executor.submit(hpc_tasks.hold_with_pid, str(shared), "guarded")
    wait_until((shared / "guarded.pid").exists, "the task to start")
    wait_until(future.running, "the task to be running")
    pid = int((shared / "guarded.pid").read_text())
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    assert future.task.cancel() is True
    wait_until(lambda: not alive(pid), "the guard to kill the task's process")
    wait_until(future.done, "the task to be reported over")
    assert future.task.status is TaskStatus.CANCELLED
    monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])


def test_prefetched_jobs_wait_for_a_free_slot(make_executor: MakeExecutor, shared: Path) -> None:
    executor = make_executor(workers=2, prefetch=2, job_name="tpahead")
    futures = [executor.submit(hpc_tasks.hold, str(shared), f"t{i}") for i in range(4)]
    wait_until(lambda: len(queued_job_ids("tpahead")) == 4, "jobs for the prefetched slots too")
    wait_until(lambda: sum(future.running() for future in futures) == 2, "two tasks to run")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        started = [i for i in range(4) if (shared / f"t{i}.started").exists()]
        assert len(started) <= 2, f"{started} ran at once with workers=2"
        time.sleep(0.05)
    for i in range(4):
        (shared / f"t{i}.release").touch()
    assert [future.result(BOUND) for future in futures] == [f"t{i}" for i in range(4)]


def test_a_prefetched_task_cancelled_before_its_go_never_runs(
    make_executor: MakeExecutor, shared: Path
) -> None:
    name = f"tpgate{os.getpid()}"  # no job of an earlier run can be counted
    executor = make_executor(workers=1, prefetch=1, job_name=name)
    futures = {task: executor.submit(hpc_tasks.hold, str(shared), task) for task in ("a", "b")}
    # whichever job is ready first gets the slot; the other waits for its go
    wait_until(lambda: any((shared / f"{task}.started").exists() for task in futures), "a task to start")
    wait_until(lambda: len(queued_job_ids(name)) == 2, "the job launched ahead to be queued")
    running = "a" if (shared / "a.started").exists() else "b"
    ahead = "b" if running == "a" else "a"
    assert futures[ahead].task.status is TaskStatus.QUEUED
    assert futures[ahead].task.cancel() is True
    (shared / f"{running}.release").touch()
    assert futures[running].result(BOUND) == running
    wait_until(lambda: queued_job_ids(name) == [], "every job to leave the queue")
    assert not (shared / f"{ahead}.started").exists()
