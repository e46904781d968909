"""The communicator of the task running on this rank, for :func:`taskplex_mpi.comm`."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["comm", "communicator"]

communicator: contextvars.ContextVar[MPI.Comm | None] = contextvars.ContextVar(
    "taskplex_mpi_communicator", default=None
)


def comm() -> MPI.Comm:
    """The communicator of the ranks that run the calling task together.

    A task submitted with ``resources={"cores": k}`` runs on ``k`` ranks at once; inside it,
    ``taskplex_mpi.comm()`` is an intracommunicator of exactly those ranks (size ``k``, ranks
    ``0..k-1``), and rank 0's return value is the task's result. A task of one rank gets
    ``MPI.COMM_SELF``. Raises RuntimeError outside a task of the mpi backend.
    """
    current = communicator.get()
    if current is None:
        raise RuntimeError(
            "taskplex_mpi.comm() is only available inside a task that runs on the mpi backend"
        )
    return current
