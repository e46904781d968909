"""Fixtures of the hpc backend's tests, which run against the real Slurm that .ci/setup-slurm starts.

Without a Slurm these tests are skipped on a developer's machine and fail in CI (CI=true), so
that a CI run without its Slurm cannot pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hpc_support import MakeExecutor

import taskplex
from taskplex_hpc.testing import slurm_problem


@pytest.fixture(scope="session")
def slurm() -> None:
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"the hpc backend's tests need a Slurm: {problem}")
    pytest.skip(f"the hpc backend's tests need a Slurm: {problem}")


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A directory the test and its jobs share for marker files."""
    directory = tmp_path / "shared"
    directory.mkdir()
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


@pytest.fixture
def make_executor(slurm: None, workdir: Path) -> Iterator[MakeExecutor]:
    """``make_executor(**options)``: an hpc Executor with test-friendly defaults, shut down after."""
    made: list[taskplex.Executor] = []

    def make(**options: Any) -> taskplex.Executor:
        settings = {"workdir": workdir, "interval": 0.1, "result_grace": 2.0, "workers": 2, **options}
        executor = taskplex.Executor("hpc", **settings)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)
