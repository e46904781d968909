"""Tasks as real Slurm jobs: templates, pysqa directories, submission failures, outputs, results."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import hpc_tasks
import pytest
from hpc_support import BOUND, MakeExecutor, queued_job_ids, run, wait_until

import taskplex
from taskplex import RemoteTraceback, ResultUnreadable, Task, TaskStatus

QUEUE_YAML = """\
queue_type: SLURM
queue_primary: short
queues:
  short: {{cores_min: 1, cores_max: 2, run_time_max: 600, memory_max: 2, script: short.sh}}
  {partition}: {{cores_min: 1, cores_max: 4, script: short.sh}}
"""

QUEUE_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --chdir={{working_directory}}
#SBATCH --output=job.out
#SBATCH --cpus-per-task={{cores}}
{%- if run_time_max %}
#SBATCH --time={{ [1, run_time_max // 60]|max }}
{%- endif %}
export TASKPLEX_TEST_QUEUE=from-queue-yaml
{{command}}
"""


def default_partition() -> str:
    for line in run(["sinfo", "--noheader", "--format=%P"]).split():
        if line.endswith("*"):
            return line.rstrip("*")
    raise AssertionError("Slurm has no default partition")


@pytest.fixture
def pysqa_directory(tmp_path: Path) -> Path:
    config = tmp_path / "pysqa"
    config.mkdir()
    (config / "queue.yaml").write_text(QUEUE_YAML.format(partition=default_partition()))
    (config / "short.sh").write_text(QUEUE_TEMPLATE)
    return config


def test_a_task_runs_in_a_job_of_a_pysqa_directory_queue(
    make_executor: MakeExecutor, pysqa_directory: Path
) -> None:
    executor = make_executor(config_path=pysqa_directory)
    future = executor.submit(hpc_tasks.environment, "TASKPLEX_TEST_QUEUE")
    assert future.result(BOUND) == "from-queue-yaml"
    assert str(future.task.worker).startswith("Slurm job ")


def test_a_named_queue_of_the_directory_is_used(
    make_executor: MakeExecutor, pysqa_directory: Path
) -> None:
    executor = make_executor(config_path=pysqa_directory, queue=default_partition(), workers=4)
    task = Task(hpc_tasks.slurm_job_id, resources={"cores": 3})
    assert executor.submit_task(task).result(BOUND) is not None


def test_requests_beyond_the_queue_yaml_limits_are_refused_not_clamped(
    make_executor: MakeExecutor, pysqa_directory: Path
) -> None:
    executor = make_executor(config_path=pysqa_directory, workers=8)
    with pytest.raises(taskplex.ResourceUnavailable, match=r"4 cores > the most a job may have \(2\)"):
        executor.submit_task(Task(abs, (1,), resources={"cores": 4}))
    with pytest.raises(taskplex.ResourceUnavailable, match="time limit"):
        executor.submit_task(Task(abs, (1,), resources={"walltime": 3600}))
    with pytest.raises(taskplex.ResourceUnavailable, match="queue 'short'"):
        executor.submit_task(Task(abs, (1,), resources={"memory": 4096}))
    assert executor.submit(abs, -5).result(BOUND) == 5


def test_requests_beyond_the_partition_are_refused_at_submit(make_executor: MakeExecutor) -> None:
    executor = make_executor(workers=1024)
    cpus = max(int(n) for n in run(["sinfo", "-N", "--noheader", "-o", "%c"]).split())
    with pytest.raises(taskplex.ResourceUnavailable, match="Slurm partition"):
        executor.submit_task(Task(abs, (1,), resources={"cores": cpus + 1}))
    with pytest.raises(taskplex.ResourceUnavailable, match="MB of memory"):
        executor.submit_task(Task(abs, (1,), resources={"memory": 10**9}))


def test_a_template_of_ones_own(make_executor: MakeExecutor) -> None:
    template = QUEUE_TEMPLATE.replace("from-queue-yaml", "from-my-template")
    executor = make_executor(template=template)
    assert executor.submit(hpc_tasks.environment, "TASKPLEX_TEST_QUEUE").result(BOUND) == (
        "from-my-template"
    )


def test_a_refused_submission_fails_only_its_task_with_sbatch_message(
    make_executor: MakeExecutor,
) -> None:
    executor = make_executor()
    refused = executor.submit_task(Task(abs, (1,), resources={"gpus": 1}, retries=3))
    fine = executor.submit(abs, -2)
    with pytest.raises(taskplex.BackendError, match="sbatch refused") as caught:
        refused.result(BOUND)
    assert "gres" in str(caught.value).lower(), "sbatch's own message is missing"
    assert refused.task.attempts <= 1, "a refused submission was retried"
    assert fine.result(BOUND) == 2


def test_user_exception_carries_traceback_and_output_and_is_not_retried(
    make_executor: MakeExecutor,
) -> None:
    executor = make_executor()
    future = executor.submit_task(Task(hpc_tasks.print_and_fail, ("boom",), retries=2))
    with pytest.raises(ValueError, match="boom") as caught:
        future.result(BOUND)
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "print_and_fail" in str(caught.value.__cause__)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "printed by the job: boom" in notes
    assert "to stderr: boom" in notes
    assert future.task.attempts == 1


@pytest.mark.parametrize(
    ("content", "mode", "words"),
    [
        (b"", 0o600, "empty"),
        (b"not a pickle", 0o600, "cannot be unpickled"),
        (b"\x80\x05", 0o666, "writable by other users"),
    ],
    ids=["empty", "corrupt", "foreign"],
)
def test_a_bad_result_file_is_an_unreadable_result(
    make_executor: MakeExecutor, content: bytes, mode: int, words: str
) -> None:
    executor = make_executor()
    future = executor.submit_task(Task(hpc_tasks.leave_result, (content, mode), retries=2))
    with pytest.raises(ResultUnreadable, match=words):
        future.result(BOUND)
    assert future.task.attempts == 1


def test_a_job_that_exits_cleanly_without_result_is_reported_within_the_grace(
    make_executor: MakeExecutor,
) -> None:
    executor = make_executor(result_grace=1.0)
    future = executor.submit(hpc_tasks.exit_cleanly_without_result)
    with pytest.raises(ResultUnreadable, match="completed but left no result"):
        future.result(BOUND)


def test_files_are_private_and_removed_at_shutdown(
    make_executor: MakeExecutor, workdir: Path, shared: Path
) -> None:
    executor = make_executor(job_name="tpfiles")
    future = executor.submit(hpc_tasks.hold, str(shared), "held")
    wait_until((shared / "held.started").exists, "the task to start")
    (run_directory,) = list(workdir.iterdir())
    (attempt,) = [path for path in run_directory.iterdir() if path.is_dir()]
    assert run_directory.stat().st_mode & 0o777 == 0o700
    assert attempt.stat().st_mode & 0o777 == 0o700
    for name in ("call", "started", "go"):
        assert (attempt / name).stat().st_mode & 0o777 == 0o600, name
    (shared / "held.release").touch()
    assert future.result(BOUND) == "held"
    executor.shutdown()
    assert list(workdir.iterdir()) == []
    assert queued_job_ids("tpfiles") == []


def test_stop_cancels_every_job_and_removes_its_files(slurm: None, workdir: Path, shared: Path) -> None:
    server = taskplex.create_server("hpc", workdir=workdir, interval=0.1, job_name="tpstop", workers=12)
    tasks = [Task(hpc_tasks.hold, (str(shared), f"t{i}")) for i in range(12)]

    async def scenario() -> None:
        async with asyncio.TaskGroup() as group:
            await server.start(group)
            for task in tasks:
                await server.submit(task)
            await asyncio.to_thread(wait_until, (shared / "t0.started").exists, "a task to start")
            await asyncio.to_thread(
                wait_until, lambda: len(queued_job_ids("tpstop")) == 12, "every job to be queued"
            )
            await asyncio.wait_for(server.stop(), BOUND)

    asyncio.run(scenario())
    assert all(task.status is TaskStatus.CANCELLED for task in tasks)
    assert queued_job_ids("tpstop") == []
    assert list(workdir.iterdir()) == []


def test_log_records_reach_the_caller(
    make_executor: MakeExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hpc.test")
    executor = make_executor()
    executor.submit(_log_something).result(BOUND)
    assert "from the job" in caplog.text


def _log_something() -> None:
    import logging

    logging.getLogger("hpc.test").info("from the job %s", os.environ.get("SLURM_JOB_ID"))
