"""Registers the ``hpc`` backend with taskplex, and its provider for the conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import taskplex
from taskplex import Server
from taskplex_hpc.server import HPCServer

if TYPE_CHECKING:
    from taskplex.conformance.provider import TestProvider


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[Server]], None]) -> None:
    register("hpc", HPCServer)


@taskplex.hookimpl
def taskplex_test_provider(backend: str) -> TestProvider | None:
    if backend != "hpc":
        return None
    from taskplex_hpc.testing import SlurmProvider

    return SlurmProvider()
