"""The mpi backend against mpi4py.futures and taskplex mp: no-op throughput on 2 worker ranks.

Usage: ``python benchmarks/bench_mpi.py [--quick] [--repeats N]``. Each measurement runs in a
fresh process (see ``harness.py``) from a plain python, so both MPI pools spawn their 2 worker
ranks; pool start-up is not timed: each one starts its pool, warms it up, then times ``map`` of
20,000 no-op calls at chunksize 1 and at chunksize 100:

- taskplex mpi (spawn mode, default options);
- ``mpi4py.futures.MPIPoolExecutor(max_workers=2)``;
- taskplex mp with 2 worker processes.

Targets (issue 10): taskplex mpi at least 2x MPIPoolExecutor at chunksize 1, and at least half
its rate at chunksize 100. Writes ``build/bench-mpi.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _tasks import noop
from harness import Candidate, NotInstalled, run_interleaved

WORKERS = 2
WARM_UP = 200
CHUNKSIZES = (1, 100)
Map = Callable[..., Iterator[Any]]
"""map(function, iterable, chunksize=...) of the pool under test."""

KINDS = {
    "mpi": "taskplex mpi (spawn)",
    "mpi4py": "mpi4py.futures MPIPoolExecutor",
    "mp": "taskplex mp",
}


@contextmanager
def open_pool(kind: str) -> Iterator[Map]:
    if kind in ("mpi", "mp"):
        import taskplex

        with taskplex.Executor(kind, workers=WORKERS) as executor:
            yield executor.map
    elif kind == "mpi4py":
        # a spawn finds MPI's process manager on PATH: the MPI wheel's, beside this python
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
        try:
            from mpi4py.futures import MPIPoolExecutor
        except ImportError as exc:
            raise NotInstalled(f"mpi4py: {exc}") from None
        with MPIPoolExecutor(max_workers=WORKERS) as pool:
            yield pool.map
    else:
        raise ValueError(f"unknown pool {kind!r}")


def throughput(n: int, kind: str, chunksize: int) -> float:
    """Calls per second of ``map(noop, range(n), chunksize=chunksize)``, results included."""
    import time

    with open_pool(kind) as pool_map:
        if list(pool_map(noop, range(WARM_UP), chunksize=1)) != list(range(WARM_UP)):
            raise AssertionError("wrong results")
        start = time.perf_counter()
        results = list(pool_map(noop, range(n), chunksize=chunksize))
        seconds = time.perf_counter() - start
    if results != list(range(n)):
        raise AssertionError("wrong results")
    return n / seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (the median is reported)")
    args = parser.parse_args(argv)
    n = 2_000 if args.quick else 20_000
    candidates = [
        Candidate(
            f"{label}, chunksize {chunksize}",
            "bench_mpi:throughput",
            {"kind": kind, "chunksize": chunksize},
            n,
        )
        for chunksize in CHUNKSIZES
        for kind, label in KINDS.items()
    ]
    measured = run_interleaved("mpi-map", candidates, args.repeats)
    rates = {(m.candidate.kwargs["kind"], m.candidate.kwargs["chunksize"]): m for m in measured}
    lines = [
        f"Machine: {os.cpu_count()} CPUs; {WORKERS} worker ranks or processes per pool; "
        f"Python {sys.version.split()[0]}",
        "",
        f"### map of {n:,} no-op calls",
        "",
        "| pool | chunksize | calls/s | taskplex mpi is |",
        "|---|---|---|---|",
    ]
    for chunksize in CHUNKSIZES:
        ours = rates["mpi", chunksize].median()
        for kind, label in KINDS.items():
            m = rates[kind, chunksize]
            rate = m.median()
            ratio = f"{ours / rate:.2f}x" if rate and ours and kind != "mpi" else ""
            shown = f"{rate:,.0f}" if rate else m.why_not()
            lines.append(f"| {label} | {chunksize} | {shown} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    build = Path(__file__).resolve().parent.parent / "build"
    build.mkdir(exist_ok=True)
    (build / "bench-mpi.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
