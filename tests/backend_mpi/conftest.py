"""Support of the mpi backend's tests: every MPI program runs in a process of its own, bounded.

An MPI program that goes wrong tends to hang rather than fail (a spawn with the wrong mpiexec,
a rank waiting for a message that never comes), so no test starts MPI in pytest's own process:
each runs a small program, with plain ``python`` (spawn mode) or under the MPICH wheel's
``mpiexec`` (world mode), in a session of its own that is killed whole when it outlives its bound.
The program reports through a JSON file, never through the ranks' interleaved output.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BOUND = 120.0
"""Seconds a test program may take before it is killed and the test fails (a busy machine)."""
TESTS = Path(__file__).resolve().parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")

PRELUDE = """
import json, os, sys, time
import taskplex
import mpi_tasks

RESULT = os.environ["MPI_TEST_RESULT"]

def report(**values):
    with open(RESULT, "w") as out:
        json.dump(values, out)
"""


@functools.cache
def open_mpi() -> bool:
    """Whether the MPI under test is Open MPI (else MPICH)."""
    answer = subprocess.run(
        [MPIEXEC, "--version"], capture_output=True, text=True, timeout=BOUND, check=False
    )
    return "Open MPI" in answer.stdout


def mpiexec_options() -> list[str]:
    """Open MPI runs no more ranks than cores unless asked to; MPICH needs no option."""
    return ["--oversubscribe"] if open_mpi() else []


@dataclass
class Finished:
    """How a test program ended, and what it reported."""

    returncode: int
    output: str
    reported: dict[str, Any]


def run_program(
    body: str,
    directory: Path,
    *,
    ranks: int | None = None,
    launcher: bool = True,
    module: str | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = BOUND,
) -> Finished:
    """Run ``PRELUDE + body`` with python (``ranks=None``) or under ``mpiexec -n ranks``, through
    ``python -m taskplex_mpi`` unless ``launcher`` is False (running ``-m module`` if given)."""
    script = directory / "program.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    result = directory / "result.json"
    if ranks is None:
        command = [sys.executable, str(script), *args]
    else:
        through = ["-m", "taskplex_mpi"] if launcher else []
        command = [MPIEXEC, *mpiexec_options(), "-n", str(ranks), sys.executable, *through]
        command += ["-m", module] if module else [str(script)]
        command += args
    # A TMPDIR of the program's own: an mpiexec killed at the end of a test leaves its session
    # files there, not where a later Open MPI whose launcher gets a recycled pid would trip on them.
    tmpdir = directory / "tmp"
    tmpdir.mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        **(env or {}),
        "MPI_TEST_RESULT": str(result),
        "PYTHONPATH": os.pathsep.join([str(TESTS), *(path for path in sys.path if path)]),
    }
    process = subprocess.Popen(
        command,
        cwd=directory,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the whole MPI job is killed on timeout
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the program did not end within {timeout:g} s; its output:\n{output}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # ranks it may have left behind
    reported = json.loads(result.read_text()) if result.exists() else {}
    return Finished(process.returncode, output, reported)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], object], what: str, timeout: float = BOUND) -> None:
    """Poll ``condition`` until it holds; fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(0.05)


def succeeded(finished: Finished) -> dict[str, Any]:
    """What the program reported; fails the test, with its output, if it did not end well."""
    assert finished.returncode == 0, finished.output
    assert finished.reported, f"the program reported nothing; its output:\n{finished.output}"
    return finished.reported
