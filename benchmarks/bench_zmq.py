"""The zmq backend against distributed peers: throughput, 5 ms task efficiency, latency.

Usage: ``python benchmarks/bench_zmq.py [--quick] [--repeats N]``. Each measurement runs in a
fresh process (see ``harness.py``); pool start-up is not timed: each one starts its pool, warms
it up, then times only the work. Every pool has 2 worker processes on this machine:

- taskplex zmq (embedded: a broker and a worker host on loopback) and taskplex mp;
- Dask ``LocalCluster(n_workers=2, threads_per_worker=1)`` + ``Client.submit``;
- ipyparallel ``Cluster(n=2)`` + a load-balanced view's ``apply_async``;
- Parsl ``HighThroughputExecutor(max_workers_per_node=2)`` on a ``LocalProvider``.

Peers that are not installed are reported as such. Writes ``build/bench-zmq.md``.

**Efficiency** is the share of the workers' time spent inside the tasks: the seconds from each
5 ms task's first to its last instruction (each measures its own span), summed, over ``WORKERS``
times the wall-clock seconds of the run. Workers left waiting between tasks lower it; it cannot
exceed 100%, and it does not depend on a reference run timed while the machine was busier or
quieter. **Task CPU share** is the same with each task's own CPU time (``time.thread_time``)
instead of its span: it is lower also when anything else — the pool's other processes, other
programs, the hypervisor — takes the CPU from a running task.

**CPU per task** (taskplex only) is the CPU time each process of the pool used while it ran
no-op tasks, per task, read with psutil: where the overhead of a task is spent.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

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


def spin_cpu(iterations: int) -> tuple[float, float]:
    """Run ``spin(iterations)``; the seconds it took, and the CPU seconds of the thread that ran it."""
    start, cpu = time.perf_counter(), time.thread_time()
    spin(iterations)
    return time.perf_counter() - start, time.thread_time() - cpu


def efficiency(n: int, kind: str, iterations: int) -> dict[str, float]:
    """``n`` CPU-bound tasks of ~5 ms on WORKERS workers: their CPU seconds, and the run's."""
    with open_pool(kind) as submit:
        for wait in [submit(spin_cpu, 1) for _ in range(WARM_UP // 10)]:
            wait()
        start = time.perf_counter()
        spans = [wait() for wait in [submit(spin_cpu, iterations) for _ in range(n)]]
        seconds = time.perf_counter() - start
    return {
        "busy": sum(span for span, _ in spans),
        "cpu": sum(cpu for _, cpu in spans),
        "seconds": seconds,
    }


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


def cpu_per_task(n: int, kind: str) -> dict[str, float]:
    """Microseconds of CPU per no-op task in each process of a taskplex pool, by its role."""
    with open_pool(kind) as submit:
        for wait in [submit(noop, i) for i in range(WARM_UP)]:
            wait()
        processes = _pool_processes()
        before = _cpu_seconds(processes)
        for wait in [submit(noop, i) for i in range(n)]:
            wait()
        after = _cpu_seconds(processes)
    return {role: 1e6 * (after[role] - before[role]) / n for role in before}


def _pool_processes() -> dict[str, list[psutil.Process]]:
    """This process (the client) and its descendants, by what they do in the pool."""
    me = psutil.Process()
    roles: dict[str, list[psutil.Process]] = {"client": [me]}
    for child in me.children(recursive=True):
        command = " ".join(child.cmdline())
        if "taskplex_zmq broker" in command:
            role = "broker"
        elif "taskplex_zmq worker" in command:
            role = "worker host"
        else:
            role = "task processes"  # and the fork server they come from
        roles.setdefault(role, []).append(child)
    return roles


def _cpu_seconds(roles: dict[str, list[psutil.Process]]) -> Counter[str]:
    used: Counter[str] = Counter()
    for role, processes in roles.items():
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:  # a task process replaced meanwhile
                continue
            used[role] += times.user + times.system
    return used


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
    if args.repeats > 1 and by_kind["zmq"].ok and by_kind["mp"].ok:
        rounds = zip(by_kind["zmq"].samples, by_kind["mp"].samples, strict=False)
        each = ", ".join(f"{z:,.0f} vs {m:,.0f} ({z / m:.2f}x)" for z, m in rounds)
        lines += ["", f"zmq vs mp in each round: {each}"]

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
    lines += [
        "",
        f"### {tasks:,} CPU-bound tasks of ~5 ms",
        "",
        "| pool | efficiency | task CPU share |",
        "|---|---|---|",
    ]
    for m in measured:
        value = m.median(lambda s: s["busy"] / WORKERS / s["seconds"])
        if not value:
            lines.append(f"| {m.candidate.label} | {m.why_not()} | |")
            continue
        cpu = m.median(lambda s: s["cpu"] / WORKERS / s["seconds"])
        lines.append(f"| {m.candidate.label} | {value:.1%} | {cpu:.1%} |")

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

    measured = run_interleaved(
        "zmq-cpu",
        [Candidate(KINDS[kind], "bench_zmq:cpu_per_task", {"kind": kind}, n) for kind in ("zmq", "mp")],
        args.repeats,
    )
    roles = ("client", "broker", "worker host", "task processes")
    lines += [
        "",
        f"### CPU per no-op task, by process ({n:,} tasks; µs)",
        "",
        f"| pool | {' | '.join(roles)} | all |",
        "|---|---|---|---|---|---|",
    ]
    for m in measured:
        if not m.ok:
            lines.append(f"| {m.candidate.label} | {m.why_not()} | | | | |")
            continue
        cells = [m.median(lambda s, role=role: s.get(role, 0.0)) or 0.0 for role in roles]
        cells.append(m.median(lambda s: sum(s.values())) or 0.0)
        lines.append(f"| {m.candidate.label} | {' | '.join(f'{c:.1f}' for c in cells)} |")

    table = "\n".join(lines)
    print(table)
    build = Path(__file__).resolve().parent.parent / "build"
    build.mkdir(exist_ok=True)
    (build / "bench-zmq.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
