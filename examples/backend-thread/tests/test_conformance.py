"""Hold the thread backend to taskplex's conformance suite: ``pytest tests``."""

from taskplex.conformance import BackendSuite


class TestThreadBackend(BackendSuite):
    backend = "thread"
