"""Registers the ``mpi`` backend with taskplex, and its provider for the conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import taskplex
from taskplex_mpi.server import MPIServer

if TYPE_CHECKING:
    from taskplex.conformance.provider import TestProvider


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[taskplex.Server]], None]) -> None:
    register("mpi", MPIServer)


@taskplex.hookimpl
def taskplex_test_provider(backend: str) -> TestProvider | None:
    if backend != "mpi":
        return None
    from taskplex_mpi.testing import MPIProvider

    return MPIProvider()
