"""The scheduler's reasons, produced for real on this Slurm where it can, and what the tasks get.

Produced here: CANCELLED (scancel from outside), TIMEOUT (the job's time limit lowered with
scontrol), OUT_OF_MEMORY (cgroup memory enforcement), NODE_FAIL (the node set down under the
job). PREEMPTED cannot be produced on this single-partition cluster without preemption configured,
so its path is tested with an injected scontrol answer, in addition to the table test in
test_hpc_options.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import hpc_tasks
import pytest
from hpc_support import BOUND, MakeExecutor, job_id_of, run, wait_until

import taskplex
from taskplex import JobCancelled, JobOutOfMemory, JobTimedOut, Task, TaskStatus
from taskplex_hpc import job_end


def test_a_job_cancelled_from_outside_is_reported_as_such(
    make_executor: MakeExecutor, shared: Path
) -> None:
    executor = make_executor()
    future = executor.submit_task(Task(hpc_tasks.hold, (str(shared), "victim"), retries=2))
    job_id = job_id_of(shared / "victim.started")
    run(["scancel", str(job_id)])
    outside = f"Slurm job {job_id} was cancelled outside taskplex"
    with pytest.raises(JobCancelled, match=outside) as caught:
        future.result(BOUND)
    end = job_end(caught.value)
    assert end is not None
    assert (end.state, end.job_id) == ("CANCELLED", job_id)
    assert future.task.attempts == 1, "a job cancelled by someone else was retried"
    assert executor.submit(abs, -1).result(BOUND) == 1


def test_a_job_past_its_time_limit_is_a_timeout_not_retried(
    make_executor: MakeExecutor, shared: Path
) -> None:
    executor = make_executor()
    task = Task(hpc_tasks.hold, (str(shared), "slow"), retries=2, resources={"walltime": 600})
    future = executor.submit_task(task)
    job_id = job_id_of(shared / "slow.started")
    # Slurm's limits are in minutes; 0 makes the controller end the job at its next check
    run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=0"])
    with pytest.raises(JobTimedOut, match="reached its time limit") as caught:
        future.result(BOUND)
    end = job_end(caught.value)
    assert end is not None
    assert end.state == "TIMEOUT"
    assert caught.value.retryable is False
    assert future.task.attempts == 1


def test_a_job_over_its_memory_is_out_of_memory(make_executor: MakeExecutor, shared: Path) -> None:
    executor = make_executor()
    task = Task(
        hpc_tasks.allocate_and_hold, (str(shared), "hungry", 400), retries=1, resources={"memory": 100}
    )
    future = executor.submit_task(task)
    with pytest.raises(taskplex.InfrastructureError) as caught:
        future.result(BOUND)
    end = job_end(caught.value)
    assert end is not None
    if end.state != "OUT_OF_MEMORY":  # no cgroup memory controller: slurmstepd's poll kills it
        assert end.state == "FAILED", end
        pytest.xfail("this machine enforces memory by polling, which ends the job FAILED")
    assert isinstance(caught.value, JobOutOfMemory)
    assert "ran out of memory" in str(caught.value)
    assert future.task.attempts == 1, "an out-of-memory job was retried with the same memory"


def resume(node: str) -> None:
    """Put ``node`` back into service if it is still down (Slurm may have done so already)."""
    state = run(["sinfo", "--noheader", "-n", node, "-o", "%T"]).strip()
    if state.startswith(("down", "drain")):
        # refused ("Invalid node state") when the node returned by itself meanwhile
        subprocess.run(
            ["scontrol", "update", f"NodeName={node}", "State=RESUME"],
            capture_output=True,
            timeout=30,
            check=False,
        )


@pytest.fixture
def node() -> Iterator[str]:
    """This machine's Slurm node, set back to service after the test."""
    name = socket.gethostname().split(".")[0]
    try:
        yield name
    finally:
        resume(name)
        wait_until(
            lambda: (
                run(["sinfo", "--noheader", "-n", name, "-o", "%T"]).strip().rstrip("*")
                in ("idle", "mixed", "allocated")
            ),
            f"node {name} to be back",
        )


def test_a_node_failure_is_retried(make_executor: MakeExecutor, shared: Path, node: str) -> None:
    executor = make_executor()
    # more than one retry: a job submitted while the node goes down can fail with it too
    task = Task(hpc_tasks.hold_on_first_run, (str(shared), "unlucky"), retries=3)
    future = executor.submit_task(task)
    job_id = job_id_of(shared / "unlucky.started")
    try:
        run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=taskplex-test"])
    finally:
        wait_until(
            lambda: "NODE_FAIL" in run(["scontrol", "show", "job", "-o", str(job_id)]),
            f"job {job_id} to end NODE_FAIL",
        )
        resume(node)
    runs = future.result(BOUND)
    assert runs >= 2, "the task was not run again after its node failed"
    assert future.task.attempts >= runs


def test_a_preempted_job_is_retried(
    make_executor: MakeExecutor, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = make_executor()
    cluster = executor.server.backend.cluster
    real_run = cluster.run

    def preempted(argv: list[str]) -> str:
        out = real_run(argv)
        if argv[:3] == ["scontrol", "show", "job"]:
            return out.replace("JobState=FAILED", "JobState=PREEMPTED")
        return out

    monkeypatch.setattr(cluster, "run", preempted)
    future = executor.submit_task(
        Task(hpc_tasks.exit_on_first_run, (str(shared), "preempted"), retries=1)
    )
    assert future.result(BOUND) == 2
    assert future.task.attempts == 2


def test_a_dead_job_without_retries_names_its_exit(make_executor: MakeExecutor, shared: Path) -> None:
    executor = make_executor()
    future = executor.submit(hpc_tasks.exit_on_first_run, str(shared), "dead")
    with pytest.raises(taskplex.JobFailed, match=r"ended FAILED .*exit code 1"):
        future.result(BOUND)
    assert future.task.status is TaskStatus.FAILED
