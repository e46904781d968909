"""Registers the ``mp`` backend with taskplex, and its provider for the conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import taskplex
from taskplex import Server
from taskplex_mp.server import MultiprocessingServer

if TYPE_CHECKING:
    from taskplex.conformance.provider import TestProvider


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[Server]], None]) -> None:
    register("mp", MultiprocessingServer)


@taskplex.hookimpl
def taskplex_test_provider(backend: str) -> TestProvider | None:
    if backend != "mp":
        return None
    from taskplex_mp.testing import MultiprocessingProvider

    return MultiprocessingProvider()
