"""Packing (``pack=True``): many tasks per pilot job, pilots sized per task shape, draining before
the pilot's walltime, tickets dropped ahead of free slots, cancelling one task of a pilot, stopping.

Where a test must know what is in the pack queues it looks at the run directory's files (the
tickets waiting, the tickets a pilot claimed), not at the backend's state."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path

import hpc_tasks
import pytest
from hpc_support import BOUND, MakeExecutor, alive, queued_job_ids, wait_until

import taskplex
from taskplex import Task, TaskStatus


def pilot_of(task: Task) -> str:
    worker = str(task.worker)
    assert worker.startswith("pilot job "), worker
    return worker.split()[2]


def waiting_tickets(workdir: Path) -> list[Path]:
    return [path for path in workdir.glob("*/queue-*/*") if path.name.isdigit()]


def claimed_tickets(workdir: Path) -> list[Path]:
    return [path for path in workdir.glob("*/claimed-*/*") if path.name.isdigit()]


def ready(ticket: Path) -> bool:
    """Whether the task of a claimed ticket said it is ready (its ``started`` file)."""
    return (ticket.parent.parent / ticket.name / "started").exists()


def assert_never_runs(
    executor: taskplex.Executor, shared: Path, blocker: Future[str], cancelled: Future[str]
) -> None:
    """Release the blocker; once its slot has run another task, the cancelled task (a
    :func:`hpc_tasks.hold`) can no longer start: it never did."""
    (shared / "blocker.release").touch()
    assert blocker.result(BOUND) == "blocker"
    assert executor.submit(abs, -1).result(BOUND) == 1
    assert isinstance(cancelled, taskplex.TaskFuture)
    assert cancelled.task.status is TaskStatus.CANCELLED
    name = cancelled.task.args[1]
    assert not (shared / f"{name}.started").exists(), f"{name} ran although cancelled"


def test_many_tasks_share_a_pilot(make_executor: MakeExecutor) -> None:
    executor = make_executor(pack=True, workers=4, pilot_idle=5.0)
    futures = [executor.submit(abs, -i) for i in range(40)]
    assert [future.result(BOUND) for future in futures] == list(range(40))
    calls = executor.server.backend.scheduler_calls
    assert calls.get("sbatch", 0) < 10, f"{calls['sbatch']} sbatch calls for 40 packed tasks"
    assert len({pilot_of(future.task) for future in futures}) < 10


def test_tasks_of_other_shapes_get_pilots_sized_for_them(make_executor: MakeExecutor) -> None:
    executor = make_executor(pack=True, workers=4, pilot_cores=2, pilot_idle=5.0)
    small = [
        executor.submit_task(Task(hpc_tasks.slurm_job_id, resources={"memory": 100})) for _ in range(2)
    ]
    large = [
        executor.submit_task(Task(hpc_tasks.slurm_job_id, resources={"memory": 300})) for _ in range(2)
    ]
    for future in small + large:
        future.result(BOUND)
    small_pilots = {pilot_of(future.task) for future in small}
    large_pilots = {pilot_of(future.task) for future in large}
    assert small_pilots.isdisjoint(large_pilots), "tasks of different memory shared a pilot"


def test_a_task_longer_than_a_pilot_is_refused_at_submit(make_executor: MakeExecutor) -> None:
    executor = make_executor(pack=True, pilot_walltime=120)
    with pytest.raises(taskplex.ResourceUnavailable, match="pilot_walltime"):
        executor.submit_task(Task(abs, (1,), timeout=500))


def test_a_pilot_starts_no_task_it_cannot_finish(make_executor: MakeExecutor, shared: Path) -> None:
    executor = make_executor(pack=True, workers=2, pilot_cores=2, pilot_walltime=70, pilot_idle=30.0)
    first = executor.submit(hpc_tasks.hold, str(shared), "first")
    wait_until((shared / "first.started").exists, "the first task to start")
    time.sleep(6)  # the pilot now has less than 55 s before it must drain
    late = executor.submit_task(Task(hpc_tasks.slurm_job_id, timeout=55))
    late.result(BOUND)
    assert pilot_of(late.task) != pilot_of(first.task), "a task was started without time to finish"
    (shared / "first.release").touch()
    assert first.result(BOUND) == "first"


def test_a_ticket_waits_ahead_of_a_busy_slot_and_once_cancelled_never_runs(
    make_executor: MakeExecutor, shared: Path, workdir: Path
) -> None:
    executor = make_executor(pack=True, workers=1)
    blocker = executor.submit(hpc_tasks.hold, str(shared), "blocker")
    wait_until((shared / "blocker.started").exists, "the blocker to start")
    ahead = executor.submit(hpc_tasks.hold, str(shared), "ahead")
    # dropped for the pilot while its only slot is busy, so that the slot need not wait for the
    # server once it frees
    wait_until(lambda: len(waiting_tickets(workdir)) == 1, "a ticket ahead of the busy slot")
    assert ahead.task.status is TaskStatus.QUEUED
    assert ahead.task.cancel() is True
    wait_until(lambda: waiting_tickets(workdir) == [], "the cancelled task's ticket to be withdrawn")
    assert_never_runs(executor, shared, blocker, ahead)


def test_a_task_claimed_beyond_workers_waits_for_its_go_and_once_cancelled_never_runs(
    make_executor: MakeExecutor, shared: Path, workdir: Path
) -> None:
    # a pilot of two slots for one worker claims the ticket dropped ahead and readies its task:
    # the go, not the pilot's free slot, decides whether and when it runs
    executor = make_executor(pack=True, workers=1, pilot_cores=2)
    blocker = executor.submit(hpc_tasks.hold, str(shared), "blocker")
    wait_until((shared / "blocker.started").exists, "the blocker to start")
    claimed = executor.submit(hpc_tasks.hold, str(shared), "claimed")
    wait_until(
        lambda: len(claimed_tickets(workdir)) == 2 and all(map(ready, claimed_tickets(workdir))),
        "the pilot to claim the second ticket and ready its task",
    )
    assert not (shared / "claimed.started").exists(), "two tasks ran at once with workers=1"
    assert claimed.task.status is TaskStatus.QUEUED
    assert claimed.task.cancel() is True
    assert_never_runs(executor, shared, blocker, claimed)


def test_the_pilot_kills_a_cancelled_task_and_the_processes_it_started(
    make_executor: MakeExecutor, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = make_executor(pack=True)
    # the server believes the task runs on another host, and a packed task gets no scancel of
    # its own: only its pilot, watching for the abort file, can stop it
    monkeypatch.setattr(executor.server.backend, "_host", "a-compute-node-elsewhere")
    future = executor.submit(hpc_tasks.spawn_and_hold, str(shared), "parent")
    wait_until((shared / "parent.pid").exists, "the task to start a process")
    wait_until(future.running, "the task to be running")
    child = int((shared / "parent.child").read_text())
    task = int((shared / "parent.pid").read_text())
    assert future.task.cancel() is True
    wait_until(lambda: not alive(task), "the pilot to kill the task's process")
    wait_until(lambda: not alive(child), "the pilot to kill the process the task started")
    wait_until(future.done, "the task to be reported over")
    assert future.task.status is TaskStatus.CANCELLED
    # the slot of the killed process runs the next tasks
    assert [executor.submit(abs, -i).result(BOUND) for i in range(3)] == [0, 1, 2]


def test_a_pilot_keeps_its_workers_and_each_task_has_its_own_output_and_log(
    make_executor: MakeExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor(pack=True, workers=1)
    with caplog.at_level(logging.WARNING, logger="hpc_tasks"):
        pids = [executor.submit(hpc_tasks.print_log_and_pid, f"t{i}").result(BOUND) for i in range(5)]
        with pytest.raises(ValueError, match="last") as failure:
            executor.submit(hpc_tasks.print_and_fail, "last").result(BOUND)
    assert len(set(pids)) == 1, f"one slot, yet the tasks ran in processes {sorted(set(pids))}"
    logged = [record.getMessage() for record in caplog.records if record.name == "hpc_tasks"]
    assert logged == [f"logged by t{i}" for i in range(5)]
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    assert "printed by the job: last" in notes
    assert "was here" not in notes, "an earlier task's output was attached to this one"


def test_cancelling_one_task_of_a_pilot_stops_only_it(make_executor: MakeExecutor, shared: Path) -> None:
    executor = make_executor(pack=True, workers=2, pilot_cores=2)
    victim = executor.submit(hpc_tasks.hold, str(shared), "victim")
    other = executor.submit(hpc_tasks.hold, str(shared), "other")
    wait_until((shared / "victim.started").exists, "the victim to start")
    wait_until((shared / "other.started").exists, "the other task to start")
    wait_until(lambda: victim.running() and other.running(), "both tasks to be running")
    assert pilot_of(victim.task) == pilot_of(other.task)
    assert victim.cancel() is False  # Future.cancel leaves running work alone
    assert victim.task.cancel() is True
    (shared / "victim.release").touch()
    time.sleep(1)
    assert not (shared / "victim.done").exists()
    (shared / "other.release").touch()
    assert other.result(BOUND) == "other"
    assert victim.task.status is TaskStatus.CANCELLED


def test_stop_cancels_pilots_and_removes_their_files(slurm: None, workdir: Path, shared: Path) -> None:
    server = taskplex.create_server(
        "hpc", workdir=workdir, interval=0.1, job_name="tppack", workers=4, pack=True
    )
    tasks = [Task(hpc_tasks.hold, (str(shared), f"t{i}")) for i in range(8)]

    async def scenario() -> None:
        async with asyncio.TaskGroup() as group:
            await server.start(group)
            for task in tasks:
                await server.submit(task)
            await asyncio.to_thread(wait_until, (shared / "t0.started").exists, "a task to start")
            await asyncio.wait_for(server.stop(), BOUND)

    asyncio.run(scenario())
    assert all(task.status is TaskStatus.CANCELLED for task in tasks)
    assert queued_job_ids("tppack") == []
    assert list(workdir.iterdir()) == []
    assert os.listdir(shared).count("t0.done") == 0
