"""Registers the ``subprocess`` backend with taskplex, and its provider for the conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import taskplex
from taskplex_subprocess.server import SubprocessServer

if TYPE_CHECKING:
    from taskplex.conformance.provider import TestProvider


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[taskplex.Server]], None]) -> None:
    register("subprocess", SubprocessServer)


@taskplex.hookimpl
def taskplex_test_provider(backend: str) -> TestProvider | None:
    if backend != "subprocess":
        return None
    from taskplex_subprocess.testing import SubprocessProvider

    return SubprocessProvider()
