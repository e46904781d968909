"""How the conformance suite runs the subprocess backend here (its test provider, not production code).

The provider treats the backend as if its workers ran elsewhere: tasks write their marker files to
a directory of the provider's own, and what a server left behind is judged by the backend's own
mark on what it started: the ``label`` environment variable every worker (and whatever its task
starts) carries, looked up in the whole process table, not only among this process's children.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from taskplex.conformance.provider import Leftovers, LocalLeftovers, TestProvider
from taskplex.errors import BackendUnavailable
from taskplex_subprocess.server import LABEL_VARIABLE

__all__ = ["LabelledLeftovers", "SubprocessProvider"]


class SubprocessProvider(TestProvider):
    """Servers labelled with a label unique to this provider, so that their processes can be found."""

    latency = 2.0
    """Every attempt starts an interpreter, which is slower than handing a task to a warm worker."""

    def __init__(self) -> None:
        self.label = f"taskplex-conformance-{uuid.uuid4().hex[:12]}"

    def options(self, workdir: Path) -> dict[str, Any]:
        if os.name != "posix":
            raise BackendUnavailable("the subprocess backend needs a POSIX system (Linux, macOS)")
        return {"label": self.label}

    def shared_directory(self, tmp_path: Path) -> Path:
        shared = tmp_path / "shared-with-workers"
        shared.mkdir(exist_ok=True)
        return shared

    def snapshot(self) -> Leftovers:
        return LabelledLeftovers(self.label)


class LabelledLeftovers(Leftovers):
    """Processes carrying ``label`` that appeared since creation, and this process's own leftovers
    (children, threads, file descriptors)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._local = LocalLeftovers()
        self._before = set(self._labelled())

    def _labelled(self) -> dict[tuple[int, float], str]:
        """The live processes carrying the label: (pid, creation time) -> command line."""
        import psutil

        found = {}
        for process in psutil.process_iter(["environ", "create_time", "cmdline", "status"]):
            info = process.info
            environ = info["environ"] or {}
            if environ.get(LABEL_VARIABLE) != self._label or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            found[(process.pid, info["create_time"])] = " ".join(info["cmdline"] or [])[:200]
        return found

    def remaining(self) -> list[str]:
        left = [
            f"process {pid} labelled {self._label!r}: {cmdline}"
            for (pid, created), cmdline in self._labelled().items()
            if (pid, created) not in self._before
        ]
        return left + self._local.remaining()
