"""The ``taskplex`` command line.

Every sub-command comes from a plugin through the ``taskplex_add_commands`` hook. This module is the
plugin of the built-in ones (``backends`` and ``map``) and is registered exactly like an installed
plugin. A sub-command's parser sets its ``handler`` default to a callable that takes the parsed
:class:`argparse.Namespace` and returns the exit status::

    @taskplex.hookimpl
    def taskplex_add_commands(subparsers):
        broker = subparsers.add_parser("zmq", help="run a ZeroMQ broker or worker")
        broker.set_defaults(handler=run_zmq)

A handler raises :class:`CommandLineError` (or a taskplex usage error such as
:class:`~taskplex.errors.UnknownBackend`) when it was used wrongly: :func:`main` prints the message as
one line on stderr and exits with status 2. Ctrl-C in a handler that does not handle it exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from taskplex import plugins
from taskplex.errors import BackendUnavailable, InvalidOption, JournalError, UnknownBackend

__all__ = [
    "DEFAULT_BACKEND",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "CommandLineError",
    "discard_stdout",
    "main",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what shells report for a program ended by Ctrl-C."""

DEFAULT_BACKEND = "mp"


class CommandLineError(Exception):
    """A command was used wrongly; the message says what was wrong and how to fix it (exit 2)."""


@plugins.hookimpl
def taskplex_add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    backends = subparsers.add_parser(
        "backends",
        help="list installed backends",
        description="List the installed backends with their distribution, version and capabilities.",
    )
    backends.add_argument("--json", action="store_true", help="print a JSON list instead")
    backends.set_defaults(handler=_list_backends)
    _add_map_command(subparsers)
    _add_journal_command(subparsers)


# ---------------------------------------------------------------------------------------------------
# taskplex backends
# ---------------------------------------------------------------------------------------------------


def _list_backends(args: argparse.Namespace) -> int:
    infos = plugins.backends()
    broken = plugins.broken_plugins()
    if args.json:
        records = [
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "server_class": f"{info.server_class.__module__}.{info.server_class.__qualname__}",
                "capabilities": info.capabilities.as_dict(),
            }
            for info in infos
        ]
        records += [{"name": b.name, "distribution": b.distribution, "broken": b.reason} for b in broken]
        print(json.dumps(records, indent=2))
        return 0
    if not infos and not broken:
        print(
            "no taskplex backend is installed; install one, e.g. `pip install taskplex-backend-mp`",
            file=sys.stderr,
        )
        return 0
    rows = [("NAME", "DISTRIBUTION", "VERSION", "CAPABILITIES")]
    for plugin in broken:
        rows.append((plugin.name, plugin.distribution or "-", "-", f"BROKEN: {plugin.reason}"))
    for info in infos:
        rows.append(
            (
                info.name,
                info.distribution or "-",
                info.version or "-",
                _capabilities_text(info.capabilities.as_dict()),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3]]))
    return 0


def _capabilities_text(capabilities: dict[str, Any]) -> str:
    """The capabilities that are true, and the honoured resources, e.g. ``remote resources=cores``."""
    words = [name for name, value in capabilities.items() if value is True]
    if capabilities.get("resources"):
        words.append("resources=" + ",".join(capabilities["resources"]))
    return " ".join(words) or "-"


# ---------------------------------------------------------------------------------------------------
# taskplex map
# ---------------------------------------------------------------------------------------------------

_MAP_DESCRIPTION = """\
Call FUNCTION once per line of a JSONL file on any backend and write one JSON record per line,
in input order. A JSON array is the positional arguments, a JSON object the keyword arguments,
any other JSON value the single argument; blank lines are skipped.

Each record is {"index": i, "ok": true, "result": ...} or
{"index": i, "ok": false, "error": {"type": ..., "message": ..., "traceback": ...}}.
A line that is not valid JSON becomes an error record; the run goes on.

Exit status: 0 all tasks succeeded, 1 some failed, 2 usage error, 130 interrupted (Ctrl-C: queued
tasks are cancelled and what finished is written; a second Ctrl-C also cancels running tasks).
"""


def _add_map_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "map",
        help="run a function over every line of a JSONL file",
        description=_MAP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "function",
        metavar="MODULE_OR_FILE:FUNCTION",
        help="the function to call, e.g. mypackage.module:function or examples/sweep.py:simulate "
        "(a file's directory is put first on sys.path and PYTHONPATH, so workers import it too)",
    )
    parser.add_argument(
        "--inputs", required=True, metavar="FILE", help="JSONL file of call arguments ('-': stdin)"
    )
    parser.add_argument(
        "--output", default="-", metavar="FILE", help="where to write the results (default: stdout)"
    )
    parser.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        metavar="NAME",
        help=f"backend to run on (default: {DEFAULT_BACKEND}; see `taskplex backends`)",
    )
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="a backend option, repeatable; VALUE is read as JSON when it parses "
        "(workers=4 is a number, start_method=spawn a string)",
    )
    parser.add_argument(
        "--workers", type=_positive_int, metavar="N", help="shorthand for --option workers=N"
    )
    parser.add_argument(
        "--journal",
        metavar="FILE",
        help="a restart journal (SQLite): lines whose call finished in an earlier run with the "
        "same journal are not run again, their recorded results are written instead",
    )
    parser.add_argument(
        "--rerun-failed",
        choices=("yes", "no"),
        default="yes",
        help="with --journal: run calls that raised in an earlier run again (default: yes)",
    )
    parser.set_defaults(handler=_run_map)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. workers=4), got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _run_map(args: argparse.Namespace) -> int:
    from taskplex._jsonl_map import run_map

    options = dict(args.options)
    if args.workers is not None:
        if options.get("workers", args.workers) != args.workers:
            raise CommandLineError(
                f"--workers {args.workers} and --option workers={options['workers']} disagree; "
                "give only one"
            )
        options["workers"] = args.workers
    journal = None
    if args.journal is not None:
        from taskplex.journal import Journal

        journal = Journal(args.journal, rerun_failed=args.rerun_failed == "yes")
    return run_map(
        args.function,
        inputs=args.inputs,
        output=args.output,
        backend=args.backend,
        options=options,
        journal=journal,
    )


# ---------------------------------------------------------------------------------------------------
# taskplex journal
# ---------------------------------------------------------------------------------------------------


def _add_journal_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "journal",
        help="show what a restart journal holds",
        description="Show what a restart journal (Executor(journal=...), map --journal) holds.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="list the recorded outcomes, oldest first")
    show.add_argument("path", metavar="FILE", help="the journal file")
    show.add_argument("--json", action="store_true", help="print one JSON object per line")
    show.set_defaults(handler=_show_journal)


def _show_journal(args: argparse.Namespace) -> int:
    import datetime

    from taskplex.journal import Journal

    if not os.path.exists(args.path):
        raise CommandLineError(f"no journal at {args.path!r}")
    journal = Journal(args.path)
    try:
        entries = list(journal.entries())
    finally:
        journal.close()
    if args.json:
        for entry in entries:
            print(json.dumps(dataclasses.asdict(entry)))
        return 0
    succeeded = sum(entry.ok for entry in entries)
    print(
        f"{args.path}: {len(entries)} outcome(s), {succeeded} succeeded, "
        f"{len(entries) - succeeded} failed"
    )
    for entry in entries:
        when = datetime.datetime.fromtimestamp(entry.finished_at).isoformat(timespec="seconds")
        label = entry.name if entry.name is not None else entry.key
        print(
            f"{when}  {'ok    ' if entry.ok else 'FAILED'}  {entry.size:>9} B  "
            f"{entry.function or '?'}  {label}"
        )
    return 0


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``taskplex`` command line with ``argv`` (default: ``sys.argv[1:]``)."""
    plugins.load_plugins()
    # The built-in commands are a plugin like any other, registered only when the CLI runs (a
    # server never imports the command line).
    if not plugins.pm.has_plugin(__name__):
        plugins.register_plugin(sys.modules[__name__], __name__)
    parser = argparse.ArgumentParser(
        prog="taskplex", description="Run Python callables on pluggable execution backends."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins.pm.hook.taskplex_add_commands(subparsers=subparsers)
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"the plugin that adds {args.command!r} did not set a handler for it")
    try:
        return int(handler(args))
    except (CommandLineError, UnknownBackend, InvalidOption, BackendUnavailable, JournalError) as exc:
        message = " ".join(str(exc).split())
        print(f"taskplex {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"taskplex {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away, e.g. `taskplex backends | head -1`
        discard_stdout()
        return 1


def discard_stdout() -> None:
    """Point stdout at /dev/null, so Python's flush at exit cannot fail on a closed pipe again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    # Run as `python -m taskplex.cli`, this file is `__main__`, while the plugin manager registered
    # the module `taskplex.cli`: use that one's main, so that both agree on CommandLineError.
    from taskplex.cli import main as _main

    sys.exit(_main())
