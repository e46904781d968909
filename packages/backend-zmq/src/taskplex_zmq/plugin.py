"""Registers the ``zmq`` backend, its ``taskplex zmq`` commands and its conformance provider."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import taskplex

if TYPE_CHECKING:
    from taskplex.conformance.provider import TestProvider


@taskplex.hookimpl
def taskplex_register_servers(register: Callable[[str, type[taskplex.Server]], None]) -> None:
    from taskplex_zmq.server import ZmqServer

    register("zmq", ZmqServer)


@taskplex.hookimpl
def taskplex_add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    from taskplex_zmq.cli import add_parser

    add_parser(subparsers)


@taskplex.hookimpl
def taskplex_test_provider(backend: str) -> TestProvider | None:
    if backend != "zmq":
        return None
    from taskplex_zmq.testing import EmbeddedProvider

    return EmbeddedProvider()
