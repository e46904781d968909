"""The mp backend against other process pools: throughput, map, CPU efficiency, latency, memory.

Every pool runs with the same number of worker processes (``WORKERS``). Pool start-up is not timed:
each measurement starts its pool, warms it up (every worker has imported the task module), then
times only the work.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _tasks import block_until, calibrate_spin, noop, spin, time_spin
from harness import Candidate, Config, Measured, run_interleaved
from pools import open_executor, open_pool, ropt_noops
from report import (
    Row,
    Section,
    Target,
    note_of,
    throughput_rows,
    unavailable,
    versus_cell,
)

WORKERS = 2
WARM_UP = 200
SPIN_SECONDS = 0.005
PPE_SUBMIT = "ProcessPoolExecutor.submit"
PPE_MAP = "ProcessPoolExecutor.map(chunksize=256)"
ROPT = "ropt 0.28 MultiprocessingServer"


# ------------------------------------------------------------------ measured in a fresh process


def submit_noops(n: int, kind: str, backend: str) -> float:
    """Seconds to submit ``n`` no-op tasks to a pool of ``kind``, then collect every result."""
    with open_pool(kind, WORKERS, backend) as pool:
        _check_sum(pool.gather([pool.submit(noop, i) for i in range(WARM_UP)]), WARM_UP)
        start = time.perf_counter()
        results = pool.gather([pool.submit(noop, i) for i in range(n)])
        elapsed = time.perf_counter() - start
    _check_sum(results, n)
    return elapsed


def ropt_submit_noops(n: int) -> float:
    """Seconds for ``n`` no-op tasks through ropt's MultiprocessingServer."""
    return ropt_noops(n, WORKERS, WARM_UP)


def map_noops(n: int, kind: str, backend: str) -> float:
    """Seconds for ``Executor.map`` over ``n`` no-op calls, both pools in chunks of 256."""
    with open_executor(kind, WORKERS, backend) as executor:
        list(executor.map(noop, range(WARM_UP)))
        start = time.perf_counter()
        results = list(executor.map(noop, range(n), chunksize=256))
        elapsed = time.perf_counter() - start
    _check_sum(results, n)
    return elapsed


def spin_tasks(n: int, kind: str, backend: str, iterations: int) -> dict[str, float]:
    """Seconds for ``n`` CPU-bound tasks, and the median time of one such task run here alone.

    The single-task time is taken before and after the pool runs, under the same conditions.
    """
    before = time_spin(iterations, 25)
    with open_executor(kind, WORKERS, backend) as executor:
        for future in [executor.submit(noop, i) for i in range(WARM_UP)]:
            future.result()
        start = time.perf_counter()
        for future in [executor.submit(spin, iterations) for _ in range(n)]:
            future.result()
        elapsed = time.perf_counter() - start
    single = statistics.mean([before, time_spin(iterations, 25)])
    return {"seconds": elapsed, "single": single}


def round_trips(n: int, kind: str, backend: str) -> list[float]:
    """Microseconds of each of ``n`` submit-and-wait round trips, one task at a time."""
    with open_executor(kind, WORKERS, backend) as executor:
        for i in range(WARM_UP):
            executor.submit(noop, i).result()
        latencies = []
        for i in range(n):
            start = time.perf_counter()
            executor.submit(noop, i).result()
            latencies.append((time.perf_counter() - start) * 1e6)
    return latencies


def queued_memory(n: int, kind: str, backend: str) -> dict[str, float]:
    """Parent RSS growth while ``n`` no-op tasks wait behind workers that are all held busy."""
    import psutil

    me = psutil.Process()
    with tempfile.TemporaryDirectory() as scratch:
        gate = os.path.join(scratch, "release")
        started = Path(scratch, "started")
        started.mkdir()
        with open_executor(kind, WORKERS, backend) as executor:
            try:
                blockers = _hold_every_worker(executor.submit, gate, started)
                gc.collect()
                before = me.memory_info().rss
                start = time.perf_counter()
                futures = [executor.submit(noop, i) for i in range(n)]
                submit_seconds = time.perf_counter() - start
                server = getattr(executor, "server", None)
                if server is not None:
                    # The executor hands submissions to its server in batches: count them all in.
                    _wait_for(lambda: server.stats.submitted >= n + blockers, 120, "submissions")
                gc.collect()
                after = me.memory_info().rss
                waiting = sum(not future.done() for future in futures)
            finally:
                Path(gate).touch()
                start = time.perf_counter()
                executor.shutdown(wait=True, cancel_futures=True)
                shutdown_seconds = time.perf_counter() - start
    return {
        "bytes_per_task": (after - before) / n,
        "rss_before": before,
        "rss_after": after,
        "waiting_when_measured": waiting,
        "cancelled": sum(future.cancelled() for future in futures),
        "submit_seconds": submit_seconds,
        "shutdown_seconds": shutdown_seconds,
    }


def _hold_every_worker(submit: Callable[..., Any], gate: str, started: Path) -> int:
    """Occupy every worker with a task that waits for ``gate``; return how many were submitted.

    A pool may send a busy worker more tasks ahead, so blockers are added until each worker has
    signalled that it holds one.
    """
    submitted = 0
    deadline = time.monotonic() + 60
    while len(os.listdir(started)) < WORKERS:
        if time.monotonic() > deadline or submitted >= 4 * WORKERS:
            raise RuntimeError(f"could not occupy all {WORKERS} workers with blocking tasks")
        if submitted < WORKERS or _quiet_for(started, 2.0):
            submit(block_until, gate, str(started), 300.0)
            submitted += 1
        time.sleep(0.05)
    return submitted


def _quiet_for(directory: Path, seconds: float) -> bool:
    newest = max((p.stat().st_mtime for p in directory.iterdir()), default=0.0)
    return time.time() - newest > seconds


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _check_sum(results: list[Any], n: int) -> None:
    # A benchmark that timed failures would flatter the candidate.
    if sum(results) != n * (n - 1) // 2:
        raise RuntimeError(f"wrong results: expected 0..{n - 1}, got a different sum")


# ------------------------------------------------------------------ the benchmarks


def _taskplex(config: Config, call: str) -> str:
    return f'taskplex Executor("{config.backend}").{call}'


def _pool(label: str, function: str, kind: str, n: int, config: Config, *, note: str = "") -> Candidate:
    kwargs = {"kind": kind, "backend": config.backend}
    return Candidate(label, f"mp_vs_peers:{function}", kwargs, n, note)


def submit_throughput(config: Config) -> Section:
    """Issue 3: submit every no-op task, then collect every result, on each pool."""
    n = config.size(20_000, 2_000)
    # The slowest peers run a few hundred (dask) or a few thousand (ropt) tasks/s: at the full size
    # they would take most of the run. Their rate does not depend on N, and rates are compared.
    n_dask = config.size(1_000, 300)
    n_ropt = config.size(5_000, 1_000)
    taskplex = _taskplex(config, "submit")
    candidates = [
        _pool(taskplex, "submit_noops", "taskplex", n, config),
        _pool(PPE_SUBMIT, "submit_noops", "ppe", n, config),
        _pool("loky get_reusable_executor().submit", "submit_noops", "loky", n, config),
        Candidate(ROPT, "mp_vs_peers:ropt_submit_noops", {}, n_ropt, _smaller(n_ropt, n)),
        _pool(
            "executorlib SingleNodeExecutor(block_allocation=True).submit",
            "submit_noops",
            "executorlib",
            n,
            config,
        ),
        _pool(
            "dask LocalCluster (processes) + Client.submit",
            "submit_noops",
            "dask",
            n_dask,
            config,
            note=_smaller(n_dask, n),
        ),
    ]
    section = Section("mp-submit", f"{n:,} no-op tasks, {WORKERS} workers: submit all, then collect")
    throughput_rows(
        section,
        run_interleaved(section.name, candidates, config.repeats),
        baseline=PPE_SUBMIT,
        targets=[
            Target(taskplex, PPE_SUBMIT, 5, "PPE.submit"),
            Target(taskplex, ROPT, 20, "ropt"),
        ],
    )
    return section


def _smaller(n: int, full: int) -> str:
    return f"smaller N ({n:,}), to keep the run short" if n < full else ""


def map_throughput(config: Config) -> Section:
    """Issue 3: Executor.map against the standard library's chunked map."""
    n = config.size(20_000, 2_000)
    taskplex = _taskplex(config, "map(chunksize=256)")
    candidates = [
        _pool(taskplex, "map_noops", "taskplex", n, config),
        _pool(PPE_MAP, "map_noops", "ppe", n, config),
    ]
    section = Section("mp-map", f"{n:,} no-op tasks, {WORKERS} workers: Executor.map")
    throughput_rows(
        section,
        run_interleaved(section.name, candidates, config.repeats),
        baseline=PPE_MAP,
        targets=[Target(taskplex, PPE_MAP, 0.5, "PPE.map")],
    )
    return section


def cpu_efficiency(config: Config) -> Section:
    """Issue 3: how close CPU-bound tasks come to all workers busy all the time."""
    n = config.size(2_000, 200)
    iterations = calibrate_spin(SPIN_SECONDS)
    taskplex = _taskplex(config, "submit")
    kwargs = {"backend": config.backend, "iterations": iterations}
    candidates = [
        Candidate(taskplex, "mp_vs_peers:spin_tasks", {**kwargs, "kind": "taskplex"}, n),
        Candidate(PPE_SUBMIT, "mp_vs_peers:spin_tasks", {**kwargs, "kind": "ppe"}, n),
    ]
    title = f"{n:,} tasks of ~{SPIN_SECONDS * 1e3:g} ms CPU, {WORKERS} workers: efficiency"
    section = Section("mp-cpu", title)
    measured = run_interleaved(section.name, candidates, config.repeats)
    efficiencies = {m.candidate.label: _efficiencies(m) for m in measured}
    baseline = _median_or_none(efficiencies[PPE_SUBMIT])
    for m in measured:
        label = m.candidate.label
        efficiency = _median_or_none(efficiencies[label])
        row = Row(
            label,
            f"{n:,}",
            unavailable(m) if efficiency is None else f"{efficiency:.1%}",
            versus=versus_cell(label, efficiency, PPE_SUBMIT, baseline),
            note=note_of(m),
        )
        if efficiency is not None:
            single = statistics.median(s["single"] for s in m.samples)
            actual = statistics.median(s["seconds"] for s in m.samples)
            ideal = n * single / WORKERS
            timing = f"one task alone {single * 1e3:.2f} ms; all {actual:.2f} s (ideal {ideal:.2f} s)"
            row.note = "; ".join(filter(None, [timing, row.note]))
        if label == taskplex:
            row.target = _verdict(section, label, "≥ 97%", efficiency, _efficient)
        section.rows.append(row)
    section.add_raw(measured)
    return section


def _efficient(value: float) -> bool:
    return value >= 0.97


def _efficiencies(m: Measured) -> list[float]:
    if not m.ok:
        return []
    return [m.candidate.n * s["single"] / WORKERS / s["seconds"] for s in m.samples]


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _verdict(
    section: Section, label: str, goal: str, value: float | None, ok: Callable[[float], bool]
) -> str:
    if value is None:
        return f"{goal}: not measured"
    if ok(value):
        return f"{goal}: met"
    section.missed.append(f"{label}: {goal}")
    return f"{goal}: MISSED"


def latency(config: Config) -> Section:
    """Issue 3: one task at a time, submit and wait: the round trip through each pool."""
    n = config.size(2_000, 300)
    taskplex = _taskplex(config, "submit(...).result()")
    ppe = "ProcessPoolExecutor.submit(...).result()"
    candidates = [
        _pool(taskplex, "round_trips", "taskplex", n, config),
        _pool(ppe, "round_trips", "ppe", n, config),
    ]
    section = Section("mp-latency", f"{n:,} round trips, one task at a time: latency")
    measured = run_interleaved(section.name, candidates, config.repeats)
    medians: dict[str, float] = {}
    for m in measured:
        if m.ok:
            pooled = sorted(value for sample in m.samples for value in sample)
            medians[m.candidate.label] = statistics.median(pooled)
            p99 = pooled[min(len(pooled) - 1, round(0.99 * (len(pooled) - 1)))]
            result = f"median {medians[m.candidate.label]:,.0f} µs, p99 {p99:,.0f} µs"
        else:
            result = unavailable(m)
        rounds = f"{len(m.samples)} round(s) pooled" if m.ok else ""
        section.rows.append(Row(m.candidate.label, f"{n:,}", result, note=rounds))
    for row in section.rows:
        if row.candidate == ppe:
            row.versus = "1.00x (baseline)"
        elif row.candidate in medians and ppe in medians:
            row.versus = f"{medians[row.candidate] / medians[ppe]:.2f}x the median latency"
        else:
            row.versus = "—"
    section.add_raw(measured)
    return section


def queued(config: Config) -> Section:
    """Issue 3: memory of the parent while many tasks wait (measured once: one run is long)."""
    n = config.size(1_000_000, 100_000)
    candidates = [
        _pool(_taskplex(config, "submit"), "queued_memory", "taskplex", n, config),
        _pool(PPE_SUBMIT, "queued_memory", "ppe", n, config, note="reference, no target"),
    ]
    section = Section("mp-memory", f"{n:,} queued no-op tasks: parent RSS growth per task")
    measured = run_interleaved(section.name, candidates, 1)
    for m in measured:
        if m.ok:
            sample = m.samples[0]
            per_task = sample["bytes_per_task"]
            result = f"{per_task:,.0f} B/task"
            note = (
                f"RSS {sample['rss_before'] / 2**20:,.0f} → {sample['rss_after'] / 2**20:,.0f} MiB; "
                f"submit {sample['submit_seconds']:.1f} s; shutdown(cancel_futures=True) "
                f"{sample['shutdown_seconds']:.1f} s"
            )
        else:
            per_task, result, note = None, unavailable(m), ""
        row = Row(m.candidate.label, f"{n:,}", result, note="; ".join(filter(None, [note, note_of(m)])))
        if m.candidate.kwargs["kind"] == "taskplex":
            row.target = _verdict(section, row.candidate, "≤ 2 KB/task", per_task, _small)
        section.rows.append(row)
    section.add_raw(measured)
    return section


def _small(per_task: float) -> bool:
    return per_task <= 2048
