"""Registers the ``thread`` backend with taskplex (the module named by the entry point)."""

from __future__ import annotations

from collections.abc import Callable

import taskplex
from taskplex_thread.server import ThreadServer


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[taskplex.Server]], None]) -> None:
    register("thread", ThreadServer)
