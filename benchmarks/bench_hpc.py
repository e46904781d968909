"""The hpc backend on a real Slurm: 500 no-op tasks, packed vs one job per task vs peers.

Usage: ``python benchmarks/bench_hpc.py [--tasks N] [--workers N] [--peers-python PATH]``.
Needs a Slurm (``.ci/setup-slurm``). One run of each candidate, each in a fresh process:

- taskplex hpc, ``pack=True`` (pilot jobs), one job per task (the default), and one job per
  task with ``prefetch=workers`` (jobs submitted ahead, waiting for a free slot);
- ropt 0.28.1 ``HPCServer`` with a submission template of its own;
- executorlib's ``SlurmClusterExecutor`` (one job per function, through pysqa);
- taskplex mp with the same number of workers, and a pilot alone (no Slurm, no server: its
  tickets and go files written beforehand, ``workers`` slots), for the time per task inside a
  pilot: the pilot's wall time from start to the last result over the number of tasks, against
  the mp backend's total time over the number of tasks.

ropt and executorlib run with this interpreter where it has them (``nox -s bench`` installs
``ropt==0.28.1`` and ``executorlib``; executorlib also needs ``h5py``), or with
``--peers-python``; otherwise they are reported as not run.
Every candidate polls every 0.1 s where it has a poll interval. Scheduler calls are counted
the same way for all: ``sbatch``, ``squeue``, ``sacct``, ``scontrol`` and ``scancel`` are
wrapped by scripts on ``PATH`` that log each call. Writes ``build/bench-hpc.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "scancel")
INTERVAL = 0.1
CHILD_TIMEOUT = 1800

ROPT_TEMPLATE = """\
#!/bin/bash
#SBATCH --output={{output}}
#SBATCH --job-name={{job_name}}
#SBATCH --chdir={{working_directory}}
#SBATCH --ntasks={{cores}}
{{command}}
"""


def noop(value: int) -> int:
    return value


# ------------------------------------------------------------------ candidates (child processes)


def run_taskplex(
    backend: str, tasks: int, workers: int, workdir: Path, **options: Any
) -> dict[str, Any]:
    import taskplex

    if backend == "hpc":
        options = {"workdir": workdir, "interval": INTERVAL, **options}
    started = time.perf_counter()
    with taskplex.Executor(backend, workers=workers, **options) as executor:
        futures = [executor.submit(noop, i) for i in range(tasks)]
        first = None
        for future in taskplex_completed(futures):
            future.result()
            if first is None:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
        inside = [
            future.task.finished_at - future.task.started_at
            for future in futures
            if future.task.started_at is not None and future.task.finished_at is not None
        ]
    return {"total": total, "first": first, "per_task": sum(inside) / len(inside)}


def run_pilot_alone(tasks: int, workers: int, workdir: Path) -> dict[str, Any]:
    """A pilot on tickets written beforehand, each with its go: what the pilot costs a task."""
    import pickle

    from taskplex.serialization import dumps_call
    from taskplex_hpc import files
    from taskplex_hpc.pilot import Pilot

    run = files.make_private_directory(workdir / "run")
    files.touch(run / files.ALIVE)
    queue = files.make_private_directory(run / f"{files.QUEUE}1c-0m-0g")
    directories = []
    for i in range(1, tasks + 1):
        directory = files.make_private_directory(run / str(i))
        function, arguments = dumps_call(noop, (i,), {})
        call = {
            "sys_path": sys.path,
            "log_levels": {},
            "function": function,
            "arguments": arguments,
            "server_silence": 120.0,
        }
        files.write_atomically(directory / files.CALL, pickle.dumps(call))
        files.write_atomically(directory / files.GO, b"")
        files.write_atomically(queue / str(i), b"0")
        directories.append(directory)
    started = time.time()
    Pilot(queue, workers, 3600.0, 0.2).run()
    ends = [(directory / files.RESULT).stat().st_mtime for directory in directories]
    first, last = min(ends) - started, max(ends) - started
    return {"total": last, "first": first, "per_task": last / tasks}


def taskplex_completed(futures: list[Any]) -> Any:
    import concurrent.futures

    return concurrent.futures.as_completed(futures)


def run_ropt(tasks: int, workers: int, workdir: Path) -> dict[str, Any]:
    import asyncio

    from ropt.workflow.servers import HPCServer, ResultsQueue, Task

    @__import__("dataclasses").dataclass(kw_only=True)
    class NoopTask(Task):
        pass

    async def main() -> dict[str, Any]:
        results = ResultsQueue()
        server = HPCServer(workdir=workdir, workers=workers, interval=INTERVAL, template=ROPT_TEMPLATE)
        started = time.perf_counter()
        first = None
        async with asyncio.TaskGroup() as group:
            await server.start(group)
            for i in range(tasks):
                await server.task_queue.put(NoopTask(function=noop, args=(i,), results_queue=results))
            for _ in range(tasks):
                item = await asyncio.to_thread(results.get, True, CHILD_TIMEOUT)
                assert item is not None, "ropt's server gave up"
                if first is None:
                    first = time.perf_counter() - started
            total = time.perf_counter() - started
            server.cancel()
        return {"total": total, "first": first}

    return asyncio.run(main())


def run_executorlib(tasks: int, workers: int, workdir: Path) -> dict[str, Any]:
    import concurrent.futures

    from executorlib import SlurmClusterExecutor

    started = time.perf_counter()
    first = None
    # pysqa's own Slurm template, which executorlib uses, needs the partition named
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True)
    partition = next(name.rstrip("*") for name in partitions.stdout.split() if name.endswith("*"))
    # executorlib submits one job per function and leaves the number at once to Slurm
    with SlurmClusterExecutor(
        cache_directory=str(workdir),
        resource_dict={"cores": 1, "partition": partition},
    ) as executor:
        futures = [executor.submit(noop, i) for i in range(tasks)]
        for future in concurrent.futures.as_completed(futures):
            future.result()
            if first is None:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
    return {"total": total, "first": first}


def child(name: str, tasks: int, workers: int, workdir: Path) -> dict[str, Any]:
    if name == "hpc-packed":
        return run_taskplex("hpc", tasks, workers, workdir, pack=True, pilot_idle=10.0)
    if name == "hpc-per-task":
        return run_taskplex("hpc", tasks, workers, workdir)
    if name == "hpc-per-task-prefetch":
        return run_taskplex("hpc", tasks, workers, workdir, prefetch=workers)
    if name == "mp":
        return run_taskplex("mp", tasks, workers, workdir)
    if name == "pilot-alone":
        return run_pilot_alone(tasks, workers, workdir)
    if name == "ropt":
        return run_ropt(tasks, workers, workdir)
    if name == "executorlib":
        return run_executorlib(tasks, workers, workdir)
    raise ValueError(name)


# ------------------------------------------------------------------ the parent: run, count, report


def counting_path(directory: Path, log: Path) -> str:
    """A PATH whose scheduler commands log each call to ``log`` and run the real one."""
    directory.mkdir()
    for command in COMMANDS:
        real = shutil.which(command)
        if real is None:
            continue
        wrapper = directory / command
        wrapper.write_text(f'#!/bin/sh\necho {command} >> "{log}"\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def measure(name: str, python: str, tasks: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-hpc-{name}-", dir=Path.cwd()) as scratch:
        base = Path(scratch)
        log = base / "calls.log"
        log.touch()
        workdir = base / "work"
        workdir.mkdir()
        env = {**os.environ, "PATH": counting_path(base / "bin", log)}
        env["PATH"] = f"{Path(python).parent}:{env['PATH']}"  # the jobs' `python`, for ropt
        env["PYTHONPATH"] = str(Path(__file__).parent)
        argv = [python, __file__, "--child", name, "--tasks", str(tasks), "--workers", str(workers)]
        argv += ["--workdir", str(workdir)]
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {CHILD_TIMEOUT} s"}
        calls = collections.Counter(log.read_text().split())
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            return {"error": " | ".join(said), "calls": dict(calls)}
        outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        outcome["calls"] = dict(calls)
        return outcome


def render(results: dict[str, dict[str, Any]], tasks: int, workers: int) -> str:
    packed = results.get("hpc-packed", {}).get("total")
    lines = [
        f"{tasks} no-op tasks, {workers} workers, one run each, on this machine's Slurm "
        f"(poll interval {INTERVAL} s).",
        "",
        "| candidate | total (s) | tasks/s | first result (s) | packed is x faster | "
        "sbatch | squeue | sacct | scontrol | scancel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, outcome in results.items():
        if "error" in outcome:
            lines.append(f"| {name} | not run: {outcome['error'][:150]} |  |  |  |  |  |  |  |  |")
            continue
        calls = outcome.get("calls", {})
        total = outcome["total"]
        compared = name.startswith(("hpc-per-task", "ropt", "executorlib"))
        ratio = f"{total / packed:.1f}" if packed and compared else ""
        counts = " | ".join(str(calls.get(command, 0)) for command in COMMANDS)
        rate, first = tasks / total, outcome["first"]
        lines.append(f"| {name} | {total:.1f} | {rate:.1f} | {first:.2f} | {ratio} | {counts} |")
    if "per_task" in results.get("hpc-packed", {}):
        seen = results["hpc-packed"]["per_task"]
        lines += [
            "",
            f"A packed task's run as the server sees it (started to result): {seen * 1000:.1f} ms "
            "on average, which includes the wait for the server's next look.",
        ]
    if "total" in results.get("pilot-alone", {}) and "total" in results.get("mp", {}):
        inside = results["pilot-alone"]["total"] / tasks
        local = results["mp"]["total"] / tasks
        lines += [
            "",
            f"Time per task inside a pilot ({workers} slots, wall time to the last result over "
            f"{tasks} tasks): {inside * 1000:.2f} ms; in the mp backend ({workers} workers, total "
            f"over {tasks} tasks): {local * 1000:.2f} ms ({inside / local:.1f}x).",
        ]
    return "\n".join(lines) + "\n"


def installed_here(*modules: str) -> str | None:
    """This interpreter, if it has all of ``modules``."""
    import importlib.util

    return sys.executable if all(importlib.util.find_spec(name) for name in modules) else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--peers-python", default=None, help="an interpreter with ropt and executorlib")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        outcome = child(args.child, args.tasks, args.workers, Path(args.workdir))
        print(json.dumps(outcome))
        return 0
    candidates = {
        "hpc-packed": sys.executable,
        "hpc-per-task": sys.executable,
        "hpc-per-task-prefetch": sys.executable,
        "ropt": args.peers_python or installed_here("ropt"),
        "executorlib": args.peers_python or installed_here("executorlib", "h5py"),
        "mp": sys.executable,
        "pilot-alone": sys.executable,
    }
    results: dict[str, dict[str, Any]] = {}
    for name, python in candidates.items():
        if args.only and name not in args.only:
            continue
        if python is None:
            results[name] = {"error": "not installed here, and no --peers-python given"}
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(name, python, args.tasks, args.workers)
        print(f"  {results[name]}", file=sys.stderr, flush=True)
    table = render(results, args.tasks, args.workers)
    print(table)
    out = ROOT / "build" / "bench-hpc.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    return 1 if any("error" in outcome for outcome in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
