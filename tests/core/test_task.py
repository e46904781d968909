"""Task: validation at construction, statuses, cancelling before submission, identity."""

from __future__ import annotations

import math
from typing import Any

import pytest

from taskplex import InvalidOption, Resources, Task, TaskCancelled, TaskStatus


def add(a: int, b: int) -> int:
    return a + b


def test_arguments_are_stored_as_given() -> None:
    task = Task(add, [1, 2], {"c": 3}, name="sum")
    assert task.function is add
    assert task.args == (1, 2)
    assert task.kwargs == {"c": 3}
    assert task.name == "sum"
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 0
    assert task.resources == Resources()


def test_kwargs_are_copied() -> None:
    kwargs = {"b": 2}
    task = Task(add, (1,), kwargs)
    kwargs["b"] = 99
    assert task.kwargs == {"b": 2}


def test_non_callable_is_rejected_with_its_type() -> None:
    with pytest.raises(InvalidOption, match=r"needs a callable as its function, got int 42"):
        Task(42)  # type: ignore[arg-type]


def test_invalid_option_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Task("not a function")  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, "5", True])
def test_bad_timeout_is_rejected(timeout: Any) -> None:
    with pytest.raises(InvalidOption, match=r"timeout must be a number of seconds > 0"):
        Task(add, timeout=timeout)


def test_fractional_timeout_is_accepted() -> None:
    assert Task(add, timeout=0.5).timeout == 0.5


@pytest.mark.parametrize("retries", [-1, 1.5, True, "2"])
def test_bad_retries_are_rejected(retries: Any) -> None:
    with pytest.raises(InvalidOption, match=r"retries must be an int >= 0"):
        Task(add, retries=retries)


def test_bad_name_is_rejected() -> None:
    with pytest.raises(InvalidOption, match=r"name must be a str or None, got int"):
        Task(add, name=7)  # type: ignore[arg-type]


def test_depends_on_takes_tasks_only() -> None:
    with pytest.raises(InvalidOption, match=r"depends_on takes Task objects, got str"):
        Task(add, depends_on=["other"])  # type: ignore[list-item]


def test_unknown_resource_names_the_valid_ones() -> None:
    with pytest.raises(InvalidOption) as info:
        Task(add, resources={"cpus": 2})
    message = str(info.value)
    assert "'cpus'" in message
    for valid in ("cores", "gpus", "memory", "walltime"):
        assert valid in message


@pytest.mark.parametrize(
    ("resources", "complaint"),
    [
        ({"cores": 0}, r"resources\.cores must be an int >= 1"),
        ({"cores": 2.0}, r"resources\.cores must be an int >= 1"),
        ({"gpus": -1}, r"resources\.gpus must be an int >= 0"),
        ({"memory": 0}, r"resources\.memory is in megabytes"),
        ({"walltime": -5}, r"resources\.walltime is in seconds"),
        ([("cores", 2)], r"resources must be a Resources or a dict, got list"),
    ],
)
def test_bad_resource_values_are_rejected(resources: Any, complaint: str) -> None:
    with pytest.raises(InvalidOption, match=complaint):
        Task(add, resources=resources)


def test_resources_from_a_mapping() -> None:
    task = Task(add, resources={"cores": 2, "memory": 512})
    assert task.resources == Resources(cores=2, memory=512)
    assert task.resources.as_dict() == {"cores": 2, "gpus": 0, "memory": 512, "walltime": None}


def test_only_the_last_three_statuses_are_terminal() -> None:
    terminal = {status for status in TaskStatus if status.terminal}
    assert terminal == {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}


def test_cancelling_an_unsubmitted_task() -> None:
    task = Task(add, (1, 2))
    assert task.cancel() is True
    assert task.status is TaskStatus.CANCELLED
    assert task.done()
    assert task.cancelled()
    assert task.finished_at is not None
    assert task.cancel() is True, "cancel is idempotent"
    with pytest.raises(TaskCancelled):
        task.outcome()


def test_outcome_of_an_unfinished_task_is_an_error() -> None:
    task = Task(add, (1, 2))
    with pytest.raises(RuntimeError, match="has not finished"):
        task.outcome()


def test_ids_are_unique() -> None:
    ids = [Task(add).id for _ in range(1000)]
    assert len(set(ids)) == len(ids)


def test_repr_names_id_name_function_and_status() -> None:
    task = Task(add, name="first")
    text = repr(task)
    assert str(task.id) in text
    assert "'first'" in text
    assert "add" in text
    assert "pending" in text
    task.cancel()
    assert "cancelled" in repr(task)


def test_repr_of_an_unnamed_task_of_a_callable_object() -> None:
    class Scale:
        def __call__(self, x: int) -> int:
            return 2 * x

    text = repr(Task(Scale()))
    assert "Scale object" in text
    assert "None" not in text
