"""Registers the ``async`` backend with taskplex."""

from __future__ import annotations

from collections.abc import Callable

import taskplex
from taskplex import Server
from taskplex_async.server import AsyncServer


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[Server]], None]) -> None:
    register("async", AsyncServer)
