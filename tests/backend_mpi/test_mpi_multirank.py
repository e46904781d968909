"""Tasks that run on several ranks at once: ``resources={"cores": k}``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_program, succeeded

MODES = {"spawn": {"ranks": None}, "world": {"ranks": 4}}
"""Spawn mode with 3 spawned ranks; world mode with 3 worker ranks (4 in the job)."""


def executor_line(mode: str) -> str:
    return (
        'taskplex.Executor("mpi", workers=3, mode="spawn")'
        if mode == "spawn"
        else 'taskplex.Executor("mpi")'
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_task_of_k_cores_runs_on_k_ranks_with_their_communicator(mode: str, tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            f"""
            from taskplex_mpi import comm
            with {executor_line(mode)} as executor:
                task = taskplex.Task(mpi_tasks.ranks_of_task, (10,), resources={{"cores": 2}})
                pair = executor.submit_task(task).result(60)
                three = executor.submit_task(
                    taskplex.Task(mpi_tasks.ranks_of_task, (1,), resources={{"cores": 3}})
                ).result(60)
                single = executor.submit(mpi_tasks.ranks_of_task, 5).result(60)
            try:
                comm()
            except RuntimeError as exc:
                outside = str(exc)
            report(pair=pair, three=three, single=single, outside=outside)
            """,
            tmp_path,
            **MODES[mode],
        )
    )
    pair, three, single = reported["pair"], reported["three"], reported["single"]
    assert pair["size"] == 2
    assert pair["gathered"] == [[0, 0], [1, 10]]
    assert len(set(pair["pids"])) == 2
    assert three["size"] == 3
    assert len(set(three["pids"])) == 3
    assert single["size"] == 1
    assert single["gathered"] == [[0, 0]]
    assert "inside a task" in reported["outside"]


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_on_one_rank_fails_the_task_at_once_without_deadlock(
    mode: str, tmp_path: Path
) -> None:
    reported = succeeded(
        run_program(
            f"""
            import traceback
            with {executor_line(mode)} as executor:
                task = taskplex.Task(
                    mpi_tasks.raise_on_one_rank, (1, os.getcwd()), resources={{"cores": 2}}
                )
                error = executor.submit_task(task).exception(60)
                waiting = not os.path.exists("rank0.released")
                open("release", "w").close()
                after = list(executor.map(mpi_tasks.double, range(10)))
            report(
                kind=type(error).__name__,
                notes=getattr(error, "__notes__", []),
                cause=str(error.__cause__),
                waiting=waiting,
                after=after,
            )
            """,
            tmp_path,
            **MODES[mode],
        )
    )
    assert reported["kind"] == "KeyError"
    assert any("rank 1 of the task's 2 ranks" in note for note in reported["notes"]), reported
    assert "raise_on_one_rank" in reported["cause"]
    assert reported["waiting"], "the failure was delivered only after the other rank returned"
    assert reported["after"] == [2 * x for x in range(10)]
