"""How the conformance suite runs the mpi backend here (its test provider, not production code).

The mode under test is the mode the suite's process is in: world mode when pytest itself runs
under ``mpiexec -n N python -m taskplex_mpi -m pytest ...`` (its servers then use the job's worker
ranks), else spawn mode. Both are held to the suite: ``nox -s conformance`` runs it both ways.

The servers are built with the default options, which send short tasks ahead to busy ranks (so
a launched task cannot always be withdrawn); with ``TASKPLEX_MPI_PREFETCH=0`` in the environment
they send none ahead, and the suite holds them to withdrawing launched tasks as well.

Workers run on this machine in both modes, so the suite's marker files live in its own temporary
directory. What a server left behind is this process's own leftovers, except for the MPI process
manager that the first spawn starts (``mpiexec`` of the singleton, MPICH's Hydra or Open MPI's
PRRTE): MPI keeps it, and its connections, for the life of the process, whichever server spawned
first. So the provider starts it before its first snapshot, and ranks that exited count as gone
even while that process manager has not reaped them yet (Hydra reaps at its next event). Open MPI
closes its connections to ranks that exited at its next MPI call, which the provider makes.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

from taskplex.conformance.provider import Leftovers, LocalLeftovers, TestProvider
from taskplex_mpi import spawning, world

__all__ = ["MPILeftovers", "MPIProvider"]

PREFETCH_VARIABLE = "TASKPLEX_MPI_PREFETCH"
"""The environment variable that sets the ``prefetch`` of the servers under test."""
PROCESS_MANAGERS = ("mpiexec -pmi_args", "hydra_pmi_proxy", "prterun", "prted", "prte ")
"""Command lines of the process managers an MPI keeps for a process that spawned."""


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
        spawning.find_launcher()  # BackendUnavailable, saying why, when spawning cannot work
        return {**options, "mode": "spawn"}

    def snapshot(self) -> Leftovers:
        if self.mode == "spawn":
            _start_process_manager()
        return MPILeftovers()


@functools.cache
def _start_process_manager() -> None:
    """Spawn one rank that leaves at once, so that MPI's process manager runs from now on."""
    spawning.prepare_environment(spawning.find_launcher())
    from mpi4py import MPI

    child = MPI.COMM_SELF.Spawn(
        sys.executable,
        ["-c", "from mpi4py import MPI; MPI.Comm.Get_parent().Disconnect()"],
        maxprocs=1,
    )
    child.Disconnect()


class MPILeftovers(Leftovers):
    """This process's leftovers (children, threads, file descriptors), MPI's process manager aside."""

    def __init__(self) -> None:
        self._local = LocalLeftovers()

    def remaining(self) -> list[str]:
        _progress()
        return [
            found
            for found in self._local.remaining()
            if not any(manager in found for manager in PROCESS_MANAGERS) and not _exited_rank(found)
        ]


def _progress() -> None:
    """Let MPI make progress: Open MPI closes its connections to ranks that exited only then."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Iprobe()


def _exited_rank(found: str) -> bool:
    """Whether ``found`` is a process that exited and waits for MPI's process manager to reap it."""
    import psutil

    match = re.match(r"process (\d+) \(zombie\)", found)
    if match is None:
        return False
    try:
        parent = psutil.Process(int(match.group(1))).parent()
        return parent is not None and parent.name() in ("hydra_pmi_proxy", "prted", "prte")
    except psutil.Error:
        return True  # reaped meanwhile
