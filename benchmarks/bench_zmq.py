"""The zmq backend against distributed peers: throughput, 5 ms task efficiency, latency.

Usage: ``python benchmarks/bench_zmq.py [--quick] [--repeats N]``. Each measurement runs in a
fresh process (see ``harness.py``); pool start-up is not timed: each one starts its pool, warms
it up, then times only the work. Every pool has 2 worker processes on this machine:

- taskplex zmq (embedded: a broker and a worker host on loopback) and taskplex mp;
- Dask ``LocalCluster(n_workers=2, threads_per_worker=1)`` + ``Client.submit``;
- ipyparallel ``Cluster(n=2)`` + a load-balanced view's ``apply_async``;
- Parsl ``HighThroughputExecutor(max_workers_per_node=2)`` on a ``LocalProvider``.

Peers that are not installed are reported as such. Writes ``build/bench-zmq.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _tasks import calibrate_spin, noop, spin
from harness import Candidate, NotInstalled, run_interleaved

WORKERS = 2
WARM_UP = 200
TASK_SECONDS = 0.005
Submit = Callable[..., Callable[[], Any]]
"""submit(function, *args) -> a callable that waits for and returns the result."""


# ------------------------------------------------------------------ the pools, each in a fresh process


@contextmanager
def open_pool(kind: str) -> Iterator[Submit]:
    if kind in ("zmq", "mp"):
        import taskplex

        with taskplex.Executor(kind, workers=WORKERS) as executor:
            yield lambda function, *args: executor.submit(function, *args).result
    elif kind == "dask":
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:
            raise NotInstalled(f"dask.distributed: {exc}") from None
        logging.getLogger("distributed").setLevel(logging.ERROR)
        with (
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True) as cluster,
            Client(cluster) as client,
        ):
            yield lambda function, *args: client.submit(function, *args, pure=False).result
    elif kind == "ipyparallel":
        try:
            import ipyparallel
        except ImportError as exc:
            raise NotInstalled(f"ipyparallel: {exc}") from None
        with ipyparallel.Cluster(n=WORKERS, log_level=logging.ERROR) as client:
            client.wait_for_engines(WORKERS, timeout=120)
            view = client.load_balanced_view()
            yield lambda function, *args: view.apply_async(function, *args).get
    elif kind == "parsl":
        yield from _parsl()
    else:
        raise ValueError(kind)


def _parsl() -> Iterator[Submit]:
    try:
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider
    except ImportError as exc:
        raise NotInstalled(f"parsl: {exc}") from None
    logging.getLogger("parsl").setLevel(logging.ERROR)
    # HTEX starts its interchange and workers by command name, from the environment's bin/
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    run_dir = tempfile.mkdtemp(prefix="parsl-")
    executor = HighThroughputExecutor(
        label="htex",
        max_workers_per_node=WORKERS,
        provider=LocalProvider(init_blocks=1, max_blocks=1),
        address="127.0.0.1",
    )
    dfk = parsl.load(Config(executors=[executor], run_dir=run_dir, strategy="none"))
    try:
        apps: dict[Callable[..., Any], Any] = {}

        def submit(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
            app = apps.get(function)
            if app is None:
                app = apps[function] = parsl.python_app(function, executors=["htex"])
            return app(*args).result

        yield submit
    finally:
        dfk.cleanup()


def throughput(n: int, kind: str) -> float:
    """Tasks per second: submit ``n`` no-op tasks, then wait for every result."""
    with open_pool(kind) as submit:
        for wait in [submit(noop, i) for i in range(WARM_UP)]:
            wait()
        start = time.perf_counter()
        waits = [submit(noop, i) for i in range(n)]
        results = [wait() for wait in waits]
        seconds = time.perf_counter() - start
    if sum(results) != n * (n - 1) // 2:
        raise AssertionError("wrong results")
    return n / seconds


def efficiency(n: int, kind: str, iterations: int) -> dict[str, float]:
    """``n`` CPU-bound tasks of ~5 ms on WORKERS workers, and one such task alone here."""
    single = statistics.median(_timed(spin, iterations) for _ in range(9))
    with open_pool(kind) as submit:
        for wait in [submit(spin, 1) for _ in range(WARM_UP // 10)]:
            wait()
        start = time.perf_counter()
        for wait in [submit(spin, iterations) for _ in range(n)]:
            wait()
        seconds = time.perf_counter() - start
    return {"single": single, "seconds": seconds}


def latency(n: int, kind: str) -> list[float]:
    """Microseconds of each of ``n`` submit-and-wait round trips, one task at a time."""
    with open_pool(kind) as submit:
        for i in range(WARM_UP // 4):
            submit(noop, i)()
        samples = []
        for i in range(n):
            start = time.perf_counter()
            submit(noop, i)()
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _timed(function: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


# ------------------------------------------------------------------ the table

KINDS = {
    "zmq": "taskplex zmq (embedded)",
    "mp": "taskplex mp",
    "dask": "Dask LocalCluster + Client.submit",
    "ipyparallel": "ipyparallel load-balanced view",
    "parsl": "Parsl HighThroughputExecutor",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (the median is reported)")
    args = parser.parse_args(argv)
    n = 2_000 if args.quick else 20_000
    lines = [
        f"Machine: {os.cpu_count()} CPUs; {WORKERS} workers per pool; Python {sys.version.split()[0]}",
        "",
    ]

    rates = run_interleaved(
        "zmq-throughput",
        [Candidate(label, "bench_zmq:throughput", {"kind": kind}, n) for kind, label in KINDS.items()],
        args.repeats,
    )
    by_kind = dict(zip(KINDS, rates, strict=True))
    zmq_rate = by_kind["zmq"].median()
    lines += [
        f"### {n:,} no-op tasks, submit then wait",
        "",
        "| pool | tasks/s | zmq is |",
        "|---|---|---|",
    ]
    for kind, m in by_kind.items():
        rate = m.median()
        ratio = f"{zmq_rate / rate:.2f}x" if rate and zmq_rate and kind != "zmq" else ""
        lines.append(f"| {KINDS[kind]} | {f'{rate:,.0f}' if rate else m.why_not()} | {ratio} |")

    iterations = calibrate_spin(TASK_SECONDS)
    tasks = 200 if args.quick else 2_000
    measured = run_interleaved(
        "zmq-efficiency",
        [
            Candidate(
                KINDS[kind], "bench_zmq:efficiency", {"kind": kind, "iterations": iterations}, tasks
            )
            for kind in KINDS
        ],
        args.repeats,
    )
    lines += ["", f"### {tasks:,} CPU-bound tasks of ~5 ms", "", "| pool | efficiency |", "|---|---|"]
    for m in measured:
        value = m.median(lambda s: tasks * s["single"] / WORKERS / s["seconds"])
        lines.append(f"| {m.candidate.label} | {f'{value:.1%}' if value else m.why_not()} |")

    trips = 100 if args.quick else 1_000
    measured = run_interleaved(
        "zmq-latency",
        [Candidate(KINDS[kind], "bench_zmq:latency", {"kind": kind}, trips) for kind in KINDS],
        args.repeats,
    )
    lines += [
        "",
        f"### one task at a time ({trips:,} round trips)",
        "",
        "| pool | median | p99 |",
        "|---|---|---|",
    ]
    for m in measured:
        if not m.ok:
            lines.append(f"| {m.candidate.label} | {m.why_not()} | |")
            continue
        samples = sorted(s for sample in m.samples for s in sample)
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        lines.append(f"| {m.candidate.label} | {statistics.median(samples):,.0f} µs | {p99:,.0f} µs |")

    table = "\n".join(lines)
    print(table)
    build = Path(__file__).resolve().parent.parent / "build"
    build.mkdir(exist_ok=True)
    (build / "bench-zmq.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
