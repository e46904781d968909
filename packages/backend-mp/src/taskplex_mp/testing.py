"""How the conformance suite runs the mp backend here (its test provider, not production code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskplex.conformance.provider import TestProvider
from taskplex_mp.server import DEFAULT_START_METHOD, _check_platform

__all__ = ["MultiprocessingProvider"]


class MultiprocessingProvider(TestProvider):
    """Workers are child processes on this machine: the default side channels apply."""

    def options(self, workdir: Path) -> dict[str, Any]:
        _check_platform()
        return {"start_method": DEFAULT_START_METHOD}
