"""Options, queue limits and parsing Slurm's answers: what is checked before any job runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import taskplex
from taskplex_hpc.cluster import (
    JobEnd,
    QueueLimits,
    parse_memory_mb,
    parse_slurm_time,
)
from taskplex_hpc.errors import error_for, job_end

QUEUE_YAML = """\
queue_type: SLURM
queue_primary: small
queues:
  small: {cores_min: 1, cores_max: 2, run_time_max: 600, memory_max: 1, script: small.sh}
"""


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": 0}, "interval must be a number of seconds > 0"),
        ({"queue_type": "pbs"}, "queue_type='pbs' is not supported"),
        ({"cores": 0}, "cores must be an int >= 1"),
        ({"gpus": -1}, "gpus must be an int >= 0"),
        ({"memory": 1.5}, "memory is in megabytes"),
        ({"walltime": "soon"}, "is not a Slurm time"),
        ({"walltime": -3}, "walltime must be seconds"),
        ({"sbatch_options": "--qos=debug"}, "sbatch_options must be a list"),
        ({"job_name": "two words"}, "job_name must be letters, digits and dashes"),
        ({"cluster": "big"}, "give config_path too"),
        ({"python": "/no/such/python"}, "no such interpreter"),
        ({"queue": ""}, "queue must be a non-empty name"),
    ],
)
def test_bad_options_say_what_is_wrong(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(taskplex.InvalidOption, match=message):
        taskplex.create_server("hpc", workdir=tmp_path, **options)


def test_a_config_path_without_queue_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(taskplex.InvalidOption, match=r"has no queue\.yaml or clusters\.yaml"):
        taskplex.create_server("hpc", workdir=tmp_path, config_path=tmp_path)


def test_a_template_that_is_not_jinja_is_refused(tmp_path: Path) -> None:
    with pytest.raises(taskplex.InvalidOption, match="template"):
        taskplex.create_server("hpc", workdir=tmp_path, template="#!/bin/bash\n{% if %}\n")


def test_a_config_path_may_keep_the_queue_type_in_a_subdirectory(tmp_path: Path) -> None:
    config = tmp_path / "pysqa" / "slurm"
    config.mkdir(parents=True)
    (config / "queue.yaml").write_text(QUEUE_YAML)
    (config / "small.sh").write_text("#!/bin/bash\n{{command}}\n")
    server = taskplex.create_server("hpc", workdir=tmp_path, config_path=tmp_path / "pysqa")
    assert server.backend.options.config_path == config


def test_limits_name_every_request_beyond_them() -> None:
    limits = QueueLimits("small", cores_min=2, cores_max=4, memory_mb_max=1024, walltime_max=600)
    assert limits.problems(2, 512, 60) == []
    problems = limits.problems(8, 2048, 3600)
    assert problems == [
        "8 cores > the most a job may have (4)",
        "2048 MB of memory > the most a job may have (1024 MB)",
        "a walltime of 3600 s > the queue's time limit (600 s)",
    ]
    assert limits.problems(1, None, None) == ["1 cores < the fewest a job may have (2)"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("UNLIMITED", None),
        ("30", 1800.0),
        ("05:30", 330.0),
        ("1:00:00", 3600.0),
        ("2-00:00:00", 172800.0),
    ],
)
def test_slurm_times_are_read(text: str, seconds: float | None) -> None:
    assert parse_slurm_time(text) == seconds


def test_memory_amounts_are_read() -> None:
    assert parse_memory_mb(2, plain_unit="G") == 2048
    assert parse_memory_mb("500M", plain_unit="G") == 500
    assert parse_memory_mb("4G", plain_unit="M") == 4096
    assert parse_memory_mb("21695", plain_unit="M") == 21695
    assert parse_memory_mb("UNLIMITED", plain_unit="M") is None


@pytest.mark.parametrize(
    ("state", "kind", "retryable", "words"),
    [
        ("TIMEOUT", taskplex.JobTimedOut, False, "reached its time limit"),
        ("OUT_OF_MEMORY", taskplex.JobOutOfMemory, False, "ran out of memory"),
        ("NODE_FAIL", taskplex.NodeFailed, True, "its node failed"),
        ("PREEMPTED", taskplex.JobPreempted, True, "was preempted"),
        ("CANCELLED", taskplex.JobCancelled, False, "cancelled outside taskplex"),
        ("FAILED", taskplex.JobFailed, True, "ended FAILED"),
        ("COMPLETED", taskplex.ResultUnreadable, False, "completed but left no result"),
    ],
)
def test_each_ending_has_its_error(
    state: str, kind: type[BaseException], retryable: bool, words: str
) -> None:
    end = JobEnd(4242, state, exit_code=0, signal=0, reason="None")
    error = error_for(end, "last words")
    assert type(error) is kind
    assert isinstance(error, taskplex.InfrastructureError)
    assert error.retryable is retryable
    assert words in str(error)
    assert "4242" in str(error)
    assert state in str(error)
    assert "last words" in str(error)
    assert job_end(error) == end


def test_the_provider_says_when_no_slurm_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskplex_hpc.testing import SlurmProvider

    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo here
    with pytest.raises(taskplex.BackendUnavailable, match="setup-slurm"):
        SlurmProvider().options(tmp_path)
