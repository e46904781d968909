"""``taskplex zmq broker | worker``: the detached mode's processes, added to the ``taskplex`` CLI.

The same parser serves ``python -m taskplex_zmq``, which is how the embedded mode starts its
local broker and worker host.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from taskplex_zmq import security

__all__ = ["add_parser", "main"]


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add ``zmq`` with its sub-commands to ``subparsers``; returns the ``zmq`` parser."""
    zmq_parser: argparse.ArgumentParser = subparsers.add_parser(
        "zmq",
        help="run a ZeroMQ broker or worker host for the zmq backend",
        description="Run the processes of the zmq backend's detached mode: one broker, and worker "
        "hosts on any machine that can reach it. Clients use taskplex.Executor('zmq', "
        "address=ADDRESS).",
    )
    commands = zmq_parser.add_subparsers(dest="zmq_command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run a broker", description="Run a broker.")
    broker.add_argument(
        "--bind",
        required=True,
        metavar="ADDRESS",
        help="the endpoint to listen on, e.g. tcp://127.0.0.1:5555 (port * for any)",
    )
    broker.add_argument(
        "--grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long the results of a silent client are kept for its return (default: 60)",
    )
    broker.add_argument(
        "--print-address",
        action="store_true",
        help="print the bound endpoint on a line of its own once listening",
    )
    _add_common(broker)
    broker.add_argument(
        "--max-message-size",
        type=int,
        default=1 << 30,
        metavar="BYTES",
        help="drop a peer that sends a larger frame (default: 1 GiB)",
    )
    broker.set_defaults(handler=_run_broker)

    worker = commands.add_parser(
        "worker",
        help="run a worker host",
        description="Run a worker host: task processes fed by a broker.",
    )
    worker.add_argument("--connect", required=True, metavar="ADDRESS", help="the broker's endpoint")
    worker.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="task processes to run (default: one per CPU)",
    )
    worker.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="tasks held beyond those running (default: 2 per process)",
    )
    worker.add_argument("--name", default=None, help="how clients see this host (default host:pid)")
    _add_common(worker)
    worker.set_defaults(handler=_run_worker)

    keygen = commands.add_parser(
        "keygen",
        help="make CurveZMQ keys for a broker and its peers",
        description="Make a broker key pair and a peer key pair in DIRECTORY, with the peer key "
        "authorized. Give the broker the whole directory, and clients and worker hosts a copy "
        "without broker.key_secret.",
    )
    keygen.add_argument("directory", metavar="DIRECTORY")
    keygen.set_defaults(handler=_keygen)
    return zmq_parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="seconds between pings (default: 0.5)",
    )
    parser.add_argument(
        "--liveness",
        type=int,
        default=6,
        metavar="N",
        help="pings missed before a peer counts as gone (default: 6)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="what this process logs on stderr (default: INFO)",
    )
    parser.add_argument(
        "--keys",
        default=None,
        metavar="DIRECTORY",
        help="CurveZMQ keys made by `taskplex zmq keygen`; required for addresses beyond loopback",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow an address beyond loopback without keys (only on a network you trust)",
    )
    parser.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)


def _logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(args.log_level)
    # records of tasks pass through a worker host on their way to their client: not printed here
    handler.addFilter(lambda record: not hasattr(record, "taskplex_zmq_key"))
    logger = logging.getLogger("taskplex.zmq")  # not "taskplex": tasks' records pass there
    logger.addHandler(handler)
    logger.setLevel(args.log_level)


def _run_broker(args: argparse.Namespace) -> int:
    import zmq

    from taskplex_zmq import broker

    _check(args.bind, args, "listen on")
    _logging(args)
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.setsockopt(zmq.MAXMSGSIZE, args.max_message_size)
    authenticator = None
    if args.keys is not None:
        authenticator = security.KeyDirectory(args.keys).configure_broker(socket)
    socket.bind(args.bind)
    if args.print_address:
        print(socket.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    try:
        broker.serve(
            socket,
            watch_fd=sys.stdin.fileno() if args.watch_stdin else None,
            heartbeat=args.heartbeat,
            liveness=args.liveness,
            grace=args.grace,
        )
    finally:
        socket.close()
        if authenticator is not None:
            authenticator.stop()
        context.term()
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from taskplex_zmq import worker

    _check(args.connect, args, "connect to")
    _logging(args)
    worker.serve(
        args.connect,
        configure=None if args.keys is None else security.KeyDirectory(args.keys).configure_peer,
        processes=args.processes,
        prefetch=args.prefetch,
        name=args.name,
        heartbeat=args.heartbeat,
        liveness=args.liveness,
        watch_fd=sys.stdin.fileno() if args.watch_stdin else None,
    )
    return 0


def _check(address: str, args: argparse.Namespace, role: str) -> None:
    from taskplex.cli import CommandLineError

    try:
        security.check_address(address, args.keys, args.insecure, role)
    except security.InsecureAddress as exc:
        raise CommandLineError(str(exc)) from None


def _keygen(args: argparse.Namespace) -> int:
    from taskplex.cli import CommandLineError

    try:
        path = security.generate_keys(args.directory)
    except FileExistsError as exc:
        raise CommandLineError(str(exc)) from None
    print(f"keys written to {path}; clients and worker hosts need a copy without broker.key_secret")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m taskplex_zmq broker|worker ...``: the same commands without the taskplex CLI."""
    parser = argparse.ArgumentParser(prog="python -m taskplex_zmq")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(["zmq", *(sys.argv[1:] if argv is None else argv)])
    from taskplex.cli import CommandLineError

    try:
        return int(args.handler(args))
    except CommandLineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
