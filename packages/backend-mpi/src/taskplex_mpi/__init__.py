"""taskplex backend on MPI ranks: ``taskplex.Executor("mpi", workers=4)``.

From a plain ``python`` it spawns its worker ranks; under
``mpiexec -n N python -m taskplex_mpi script.py`` it uses ranks 1..N-1 of the job. A task submitted
with ``resources={"cores": k}`` runs on k ranks at once and reaches their communicator through
:func:`comm`.

Names are imported on first use, so that ``python -m taskplex_mpi`` imports nothing of taskplex
before the script does (pytest, run that way, can then still rewrite taskplex's assertions).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskplex_mpi._current import comm
    from taskplex_mpi.server import MPIBackend, MPIServer

__all__ = ["MPIBackend", "MPIServer", "comm"]

_LAZY = {
    "MPIBackend": "taskplex_mpi.server",
    "MPIServer": "taskplex_mpi.server",
    "comm": "taskplex_mpi._current",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
