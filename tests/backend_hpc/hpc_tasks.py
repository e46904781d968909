"""Task functions for the hpc backend's tests; importable by name in the batch jobs.

They report what they did through files in a directory the test owns (never through the API under
test), and every wait in them is bounded. A job runs in its attempt's directory (``--chdir``), so
a function can also damage its own result file on purpose.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

BOUND = 60.0


def record_run(directory: str, name: str) -> int:
    """Count one more run of ``name`` (files ``<name>.run<n>``); its number, from 1."""
    run = 1
    while True:
        try:
            os.close(os.open(Path(directory) / f"{name}.run{run}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            run += 1
        else:
            return run


def hold(directory: str, name: str) -> str:
    """Write ``<name>.started`` (with the Slurm job id), wait for ``<name>.release``; return name."""
    folder = Path(directory)
    run = record_run(directory, name)
    (folder / f"{name}.started").write_text(f"{os.environ.get('SLURM_JOB_ID', '?')} {run}")
    deadline = time.monotonic() + BOUND
    while not (folder / f"{name}.release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not released within {BOUND} s")
        time.sleep(0.02)
    return name


def hold_on_first_run(directory: str, name: str) -> int:
    """On the first run, hold (to be killed); on later runs return the run number at once."""
    run = record_run(directory, name)
    if run == 1:
        (Path(directory) / f"{name}.started").write_text(os.environ.get("SLURM_JOB_ID", "?"))
        time.sleep(BOUND)
    return run


def exit_on_first_run(directory: str, name: str) -> int:
    """On the first run, end the job's process without a result; later, return the run number."""
    run = record_run(directory, name)
    if run == 1:
        os._exit(1)
    return run


def print_and_fail(message: str) -> None:
    print(f"printed by the job: {message}", flush=True)
    print(f"to stderr: {message}", file=sys.stderr, flush=True)
    raise ValueError(message)


def allocate_and_hold(directory: str, name: str, megabytes: int) -> int:
    """Touch ``megabytes`` of memory page by page, then hold; the allocation's size."""
    (Path(directory) / f"{name}.started").write_text(os.environ.get("SLURM_JOB_ID", "?"))
    block = bytearray(megabytes * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    time.sleep(BOUND)
    return len(block)


def leave_result(content: bytes, mode: int) -> None:
    """Write ``content`` as this attempt's result file (mode ``mode``) and end the job at once."""
    path = Path("result")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, content)
    os.close(fd)
    os.chmod(path, mode)
    os._exit(0)


def exit_cleanly_without_result() -> None:
    os._exit(0)


def environment(name: str) -> str | None:
    return os.environ.get(name)


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def hold_with_pid(directory: str, name: str) -> str:
    """Write this process's pid to ``<name>.pid``, then hold like :func:`hold`."""
    path = Path(directory) / f"{name}.pid"
    path.with_suffix(".tmp").write_text(str(os.getpid()))
    path.with_suffix(".tmp").rename(path)
    return hold_with_pid(directory, name)


def spawn_and_hold(directory: str, name: str) -> str:
    """Start a ``sleep`` of its own and write its pid to ``<name>.child``, then
    :func:`hold_with_pid`."""
    child = subprocess.Popen(["sleep", str(BOUND)])
    path = Path(directory) / f"{name}.child"
    path.with_suffix(".tmp").write_text(str(child.pid))
    path.with_suffix(".tmp").rename(path)
    return hold_with_pid(directory, name)


def print_log_and_pid(name: str) -> int:
    """Print and log a line naming ``name``; the pid of the process that ran it."""
    print(f"{name} was here", flush=True)
    logging.getLogger("hpc_tasks").warning("logged by %s", name)
    return os.getpid()
