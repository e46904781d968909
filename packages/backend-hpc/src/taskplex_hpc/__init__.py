"""taskplex's HPC backend: ``taskplex.Executor("hpc", workdir=..., workers=8)`` runs each task as a
Slurm batch job, submitted and watched through pysqa."""

from taskplex_hpc.cluster import JobEnd
from taskplex_hpc.errors import job_end
from taskplex_hpc.server import HPCBackend, HPCServer

__all__ = ["HPCBackend", "HPCServer", "JobEnd", "job_end"]
