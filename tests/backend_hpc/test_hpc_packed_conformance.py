"""The whole conformance suite once more, with tasks packed into pilot jobs (``pack=True``).

``nox -s conformance`` holds the hpc backend to the suite with its default options (one job per
task); the packed mode runs the tasks through another path (tickets, pilots, the pilots'
workers), so it is held to the same contracts here.
"""

from taskplex.conformance import BackendSuite
from taskplex_hpc.testing import PackedSlurmProvider


class TestPackedHPC(BackendSuite):
    backend = "hpc"
    provider = PackedSlurmProvider()
