"""Hold the thread backend to taskplex's conformance suite: ``pytest tests``."""

from pathlib import Path
from typing import Any

from taskplex.conformance import BackendSuite
from taskplex.conformance.provider import TestProvider


class ThreadProvider(TestProvider):
    """Threads need nothing from the machine; setting our own option runs it under the suite."""

    def options(self, workdir: Path) -> dict[str, Any]:
        return {"thread_name_prefix": "taskplex-conformance"}


class TestThreadBackend(BackendSuite):
    backend = "thread"
    provider = ThreadProvider()
