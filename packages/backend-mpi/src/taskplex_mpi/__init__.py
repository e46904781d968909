"""taskplex backend on MPI ranks: ``taskplex.Executor("mpi", workers=4)``.

From a plain ``python`` it spawns its worker ranks; under
``mpiexec -n N python -m taskplex_mpi script.py`` it uses ranks 1..N-1 of the job. A task submitted
with ``resources={"cores": k}`` runs on k ranks at once and reaches their communicator through
:func:`comm`.
"""

from taskplex_mpi._current import comm
from taskplex_mpi.server import MPIBackend, MPIServer

__all__ = ["MPIBackend", "MPIServer", "comm"]
