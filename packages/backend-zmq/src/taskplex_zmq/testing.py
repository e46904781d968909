"""How the conformance suite runs the zmq backend here (its test providers, not production code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskplex.conformance.provider import TestProvider

__all__ = ["EmbeddedProvider"]


class EmbeddedProvider(TestProvider):
    """The embedded mode: broker and worker host are child processes on this machine, so the
    default side channels (kill a pid, this process's children) apply."""

    latency = 1.5
    """A task crosses two more processes than in a local pool."""

    def options(self, workdir: Path) -> dict[str, Any]:
        return {}
