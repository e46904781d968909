"""What the restart journal costs: no-op tasks on the mp backend with and without a journal."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _tasks import noop
from harness import Candidate, Config, run_interleaved
from report import Section, Target, throughput_rows

WORKERS = 2
WARM_UP = 200
WITHOUT = 'taskplex Executor("mp").submit, no journal'
WITH = 'taskplex Executor("mp", journal=...).submit'


def submit_noops(n: int, journal: bool) -> float:
    """Seconds to submit ``n`` no-op tasks and collect them; with a journal in a new file."""
    import taskplex

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "run.db" if journal else None
        with taskplex.Executor("mp", workers=WORKERS, journal=path) as executor:
            for future in [executor.submit(noop, -i - 1) for i in range(WARM_UP)]:
                future.result()
            start = time.perf_counter()
            futures = [executor.submit(noop, i) for i in range(n)]
            results = [future.result() for future in futures]
            elapsed = time.perf_counter() - start
        # every outcome on disk is part of the cost: shut down waits for the writes
        if journal:
            assert path is not None
            journal_entries = taskplex.Journal(path)
            recorded = len(journal_entries)
            journal_entries.close()
            if recorded != n + WARM_UP:
                raise RuntimeError(f"the journal holds {recorded} outcomes, not {n + WARM_UP}")
    if sum(results) != n * (n - 1) // 2:
        raise RuntimeError("wrong results")
    return elapsed


def throughput(config: Config) -> Section:
    """Issue 11: with the journal on, mp's no-op throughput stays >= 50% of what it is without."""
    n = config.size(20_000, 2_000)
    candidates = [
        Candidate(WITHOUT, "journal_cost:submit_noops", {"journal": False}, n),
        Candidate(WITH, "journal_cost:submit_noops", {"journal": True}, n),
    ]
    section = Section(
        "journal", f"{n:,} no-op tasks, {WORKERS} mp workers: submit all, collect, with and without"
    )
    throughput_rows(
        section,
        run_interleaved(section.name, candidates, config.repeats),
        baseline=WITHOUT,
        targets=[Target(WITH, WITHOUT, 0.5, "no journal")],
    )
    return section
