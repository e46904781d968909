"""The ``taskplex`` command line; its built-in commands are a plugin like any other."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from taskplex import plugins


@plugins.hookimpl
def taskplex_add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    backends = subparsers.add_parser("backends", help="list installed backends")
    backends.set_defaults(handler=_backends)


def _backends(args: argparse.Namespace) -> int:
    for info in plugins.backends():
        caps = [k for k, v in info.capabilities.as_dict().items() if v is True]
        print(info.name, info.distribution, info.version, ",".join(caps))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    plugins.load_plugins()
    parser = argparse.ArgumentParser(prog="taskplex")
    subparsers = parser.add_subparsers(dest="command", required=True)
    plugins.pm.hook.taskplex_add_commands(subparsers=subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
