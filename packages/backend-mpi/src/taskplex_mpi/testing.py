"""How the conformance suite runs the mpi backend here (its test provider, not production code).

The mode under test is the mode the suite's process is in: world mode when pytest itself runs
under ``mpiexec -n N python -m taskplex_mpi -m pytest ...`` (its servers then use the job's worker
ranks), else spawn mode. Both are held to the suite: ``nox -s conformance`` runs it both ways.

The servers are built with the default options, which send short tasks ahead to busy ranks (so
a launched task cannot always be withdrawn); with ``TASKPLEX_MPI_PREFETCH=0`` in the environment
they send none ahead, and the suite holds them to withdrawing launched tasks as well.

Workers run on this machine in both modes, so the suite's marker files live in its own temporary
directory, and what a server left behind is found among this process's children: in spawn mode
the spawn host, MPI's process manager and the ranks all descend from it. A rank that exited may
wait a moment for MPI's process manager to reap it (Hydra reaps at its next event): it counts
as gone.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from taskplex.conformance.provider import Leftovers, LocalLeftovers, TestProvider
from taskplex.errors import BackendUnavailable
from taskplex_mpi import world

__all__ = ["MPILeftovers", "MPIProvider"]

PREFETCH_VARIABLE = "TASKPLEX_MPI_PREFETCH"
"""The environment variable that sets the ``prefetch`` of the servers under test."""
CHECK_TIMEOUT = 60.0
PROCESS_MANAGERS = ("hydra_pmi_proxy", "prted", "prte")
"""Process names of the MPI process managers that parent spawned ranks."""


class MPIProvider(TestProvider):
    """Servers in the mode of this process; see the module's docstring."""

    latency = 2.0
    """Messages between ranks are polled for, and ranks start with MPI's own start-up."""

    def __init__(self) -> None:
        self.mode = "world" if world.active() else "spawn"
        if self.mode == "world":
            self.max_workers = world.free_ranks()

    def options(self, workdir: Path) -> dict[str, Any]:
        options: dict[str, Any] = {}
        prefetch = os.environ.get(PREFETCH_VARIABLE)
        if prefetch is not None:
            options["prefetch"] = int(prefetch)
        if self.mode == "world":
            # "auto", not "world": a program the suite starts with plain python (to see what
            # happens at its exit) is not in the job, and spawns its own ranks instead
            return {**options, "mode": "auto"}
        _check_spawning()
        return {**options, "mode": "spawn"}

    def snapshot(self) -> Leftovers:
        return MPILeftovers()


@functools.cache
def _check_spawning() -> None:
    """BackendUnavailable, saying why, when spawning cannot work here (checked in a process of its
    own, as a spawn host would: MPI is never started in the suite's process)."""
    check = subprocess.run(
        [sys.executable, "-c", "from taskplex_mpi import spawning; spawning.find_launcher()"],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
        check=False,
    )
    if check.returncode != 0:
        raise BackendUnavailable(check.stderr.strip().splitlines()[-1] if check.stderr else "?")


class MPILeftovers(Leftovers):
    """This process's leftovers (children, threads, file descriptors); exited ranks aside."""

    def __init__(self) -> None:
        self._local = LocalLeftovers()

    def remaining(self) -> list[str]:
        return [found for found in self._local.remaining() if not _exited_rank(found)]


def _exited_rank(found: str) -> bool:
    """Whether ``found`` is a process that exited and waits for MPI's process manager to reap it."""
    import psutil

    match = re.match(r"process (\d+) \(zombie\)", found)
    if match is None:
        return False
    try:
        parent = psutil.Process(int(match.group(1))).parent()
        return parent is not None and parent.name() in PROCESS_MANAGERS
    except psutil.Error:
        return True  # reaped meanwhile
