"""Fixtures shared by the repository's own tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskplex import plugins


@pytest.fixture
def register_plugin() -> Iterator[Callable[[Any], None]]:
    """Register plugin objects with taskplex for one test; they are unregistered afterwards."""
    plugins.load_plugins()
    registered: list[Any] = []

    def register(plugin: Any) -> None:
        plugins.pm.register(plugin)
        registered.append(plugin)

    try:
        yield register
    finally:
        for plugin in registered:
            plugins.pm.unregister(plugin)
