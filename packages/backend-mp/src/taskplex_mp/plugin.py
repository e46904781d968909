"""Registers the ``mp`` backend with taskplex."""

from __future__ import annotations

from collections.abc import Callable

import taskplex
from taskplex import Server
from taskplex_mp.server import MultiprocessingServer


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[Server]], None]) -> None:
    register("mp", MultiprocessingServer)
