"""``mpiexec -n N python -m taskplex_mpi script.py [args]``: see :mod:`taskplex_mpi.world`."""

from taskplex_mpi.world import main

main()
