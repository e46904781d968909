"""Run the benchmarks side by side with peer libraries; print and write the table.

Usage: ``python benchmarks/run.py [--quick] [--only NAME ...] [--repeats N] [--backend NAME]``
(``nox -s bench -- --quick`` passes the options through). Writes ``build/bench.md`` (the table)
and ``build/bench.json`` (every raw sample). Speed is compared here, as ratios measured in one run,
and never asserted in tests.

Exits with status 1 when a measurement failed (a peer that is not installed is reported, not failed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import async_vs_gather
import journal_cost
import mp_vs_peers
from harness import Config
from report import Section, write

BENCHMARKS: dict[str, Callable[[Config], Section]] = {
    "async": async_vs_gather.throughput,
    "async-hooks": async_vs_gather.hook_cost,
    "mp-submit": mp_vs_peers.submit_throughput,
    "mp-map": mp_vs_peers.map_throughput,
    "mp-cpu": mp_vs_peers.cpu_efficiency,
    "mp-latency": mp_vs_peers.latency,
    "mp-memory": mp_vs_peers.queued,
    "journal": journal_cost.throughput,
}
DISTRIBUTIONS = (
    "taskplex-core",
    "taskplex-backend-async",
    "taskplex-backend-mp",
    "loky",
    "executorlib",
    "ropt",
    "dask",
    "distributed",
)
BUILD_DIR = Path(__file__).resolve().parent.parent / "build"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round: a smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable); one of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="rounds of interleaved measurements, the median is reported (default 3, quick 1)",
    )
    parser.add_argument(
        "--backend",
        default="mp",
        help="the taskplex backend the process-pool benchmarks run (default: mp)",
    )
    parser.add_argument(
        "--output", type=Path, default=BUILD_DIR, help=f"where to write the reports ({BUILD_DIR})"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def describe_machine(config: Config) -> tuple[list[str], dict[str, object]]:
    """Header lines for the table and the same facts for the JSON report."""
    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "quick": config.quick,
        "repeats": config.repeats,
        "backend": config.backend,
        "versions": versions,
    }
    installed = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "none"
    header = [
        f"{meta['date']} · Python {meta['python']} · {meta['platform']} · {meta['cpus']} CPUs"
        + (f" · load average {load:.2f} at start" if load is not None else ""),
        f"{'Quick smoke run' if config.quick else 'Full run'}; each measurement runs in a fresh "
        f"process, candidates interleaved, median of {config.repeats} round(s) unless noted. "
        f"Versions: {installed}.",
    ]
    return header, meta


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    config = Config(quick=args.quick, repeats=repeats, backend=args.backend)
    header, meta = describe_machine(config)
    selected = args.only or list(BENCHMARKS)
    started = time.perf_counter()
    sections = [BENCHMARKS[name](config) for name in selected]
    meta["seconds"] = round(time.perf_counter() - started, 1)
    header.append(f"Total time {meta['seconds']:.0f} s.")
    print(write(sections, header, meta, args.output))
    print(f"written to {args.output / 'bench.md'} and {args.output / 'bench.json'}", file=sys.stderr)
    errors = [line for section in sections for line in section.errors]
    for line in errors:
        print(f"measurement failed: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
