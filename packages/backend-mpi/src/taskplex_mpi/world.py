"""World mode: ``mpiexec -n N python -m taskplex_mpi script.py [args]``.

Rank 0 runs the script as ``__main__`` (or ``-m module``, as ``python -m`` would); ranks 1..N-1
serve the mpi backend's servers that the script creates, one server after another, until the
script ends. The script needs no MPI code: ``taskplex.Executor("mpi")`` there takes the free worker
ranks (``workers=k`` takes k of them), and gives them back when it shuts down. Servers may run side
by side as long as there are free ranks for each.

When a rank dies, mpiexec ends the whole job, rank 0 included: the MPI standard leaves nothing
else to rely on, and that is why world mode does not declare ``survives_worker_death``.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading
from typing import TYPE_CHECKING

from taskplex_mpi._protocol import EXIT, ORDERS, STOP

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["active", "claim", "free_ranks", "main", "release"]

USAGE = "usage: mpiexec -n N python -m taskplex_mpi (script.py | -m module) [args ...]"

FIRST_TAG, LAST_TAG = 100, 30000
"""Reply tags of world-mode servers (MPI guarantees tags up to 32767); each server has its own, so
that a late reply to a stopped server is never taken for one to the next."""


class _Ranks:
    """The worker ranks of this world, which of them are free, and the next reply tag."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.all: list[int] = []
        self.free: list[int] = []
        self.active = False
        self.tag = FIRST_TAG


_ranks = _Ranks()


def active() -> bool:
    """Whether this process is rank 0 of a world started by ``python -m taskplex_mpi``."""
    return _ranks.active


def free_ranks() -> int:
    """How many worker ranks no server holds now."""
    with _ranks.lock:
        return len(_ranks.free)


def claim(count: int | None) -> tuple[list[int], int]:
    """Take ``count`` free worker ranks (None: all free ones) and a reply tag of one's own."""
    with _ranks.lock:
        free = _ranks.free
        if count is None:
            count = len(free)
        if count < 1 or count > len(free):
            raise ValueError(
                f"world mode has {len(_ranks.all)} worker rank(s), {len(free)} of them free, and "
                f"{count} were asked for; start more ranks (mpiexec -n N gives N-1 workers) or "
                "ask for fewer workers"
            )
        ranks, free[:] = free[:count], free[count:]
        _ranks.tag = _ranks.tag + 1 if _ranks.tag < LAST_TAG else FIRST_TAG
        return ranks, _ranks.tag


def release(ranks: list[int]) -> None:
    """Give ranks back once their server stopped them."""
    with _ranks.lock:
        _ranks.free.extend(ranks)
        _ranks.free.sort()


def _dismiss(world: MPI.Comm) -> None:
    """Tell every free worker rank that no server will come any more (at rank 0's exit)."""
    with _ranks.lock:
        ranks = list(_ranks.free)
        _ranks.free.clear()
    requests = [world.isend([(STOP, EXIT)], dest=rank, tag=ORDERS) for rank in ranks]
    for request in requests:
        request.wait()


JOB_VARIABLES = ("PMI_", "PMIX_", "OMPI_COMM_WORLD_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
"""Prefixes of the variables through which mpiexec tells a process that it is a rank of the job."""


def _forget_the_job() -> None:
    """MPI has read the job's variables; programs the script starts must not think they are ranks.

    A python the script starts (a subprocess, a spawn-mode server of its own) would otherwise try
    to join this job as one of its ranks.
    """
    for name in [name for name in os.environ if name.startswith(JOB_VARIABLES)]:
        del os.environ[name]


def main() -> None:
    """Entry point of ``python -m taskplex_mpi``."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help") or args == ["-m"]:
        sys.exit(USAGE)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    _forget_the_job()
    if world.Get_rank() != 0:
        from taskplex_mpi.worker import serve

        while serve(world, world, 0) != EXIT:
            pass
        return
    with _ranks.lock:
        _ranks.all = list(range(1, world.Get_size()))
        _ranks.free = list(_ranks.all)
        _ranks.active = True
    # registered before the script runs, so it runs after the atexit work of the script's
    # executors (which complete their tasks first), and before mpi4py finalizes MPI
    atexit.register(_dismiss, world)
    if args[0] == "-m":
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")
