"""Hold the subprocess backend to taskplex's conformance suite: ``pytest tests``."""

from taskplex.conformance import BackendSuite


class TestSubprocessBackend(BackendSuite):
    backend = "subprocess"
