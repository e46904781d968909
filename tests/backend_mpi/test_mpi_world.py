"""World mode: ``mpiexec -n N python -m taskplex_mpi script.py [args]``."""

from __future__ import annotations

from pathlib import Path

from conftest import run_program, succeeded


def test_rank_0_runs_the_script_and_the_other_ranks_its_tasks(tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            """
            with taskplex.Executor("mpi") as executor:
                workers = executor.server.workers
                results = list(executor.map(mpi_tasks.double, range(50)))
                pids = {executor.submit(mpi_tasks.where).result(60)[0] for _ in range(20)}
            report(argv=sys.argv[1:], name=__name__, workers=workers, results=results,
                   pids=sorted(pids), me=os.getpid())
            """,
            tmp_path,
            ranks=3,
            args=("first", "--second"),
        )
    )
    assert reported["argv"] == ["first", "--second"]
    assert reported["name"] == "__main__"
    assert reported["workers"] == 2
    assert reported["results"] == [2 * x for x in range(50)]
    assert reported["me"] not in reported["pids"]
    assert 1 <= len(reported["pids"]) <= 2


def test_executors_share_the_worker_ranks(tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            """
            one = taskplex.Executor("mpi", workers=1)
            two = taskplex.Executor("mpi", workers=1)
            both = [one.submit(mpi_tasks.double, 1).result(60)]
            both.append(two.submit(mpi_tasks.double, 2).result(60))
            try:
                taskplex.Executor("mpi", workers=1)
            except taskplex.BackendUnavailable as exc:
                refused = str(exc)
            one.shutdown()
            two.shutdown()
            with taskplex.Executor("mpi") as again:
                workers = again.server.workers
            report(both=both, refused=refused, workers=workers)
            """,
            tmp_path,
            ranks=3,
        )
    )
    assert reported["both"] == [2, 4]
    assert "0 of them free" in reported["refused"]
    assert reported["workers"] == 2


def test_work_submitted_without_shutdown_completes_before_the_job_ends(tmp_path: Path) -> None:
    finished = run_program(
        """
        executor = taskplex.Executor("mpi")
        for i in range(6):
            executor.submit(mpi_tasks.sleep_then_mark, "program.py", f"done{i}")
        report(submitted=6)
        """,
        tmp_path,
        ranks=3,
    )
    assert succeeded(finished) == {"submitted": 6}
    assert sorted(path.name for path in tmp_path.glob("done*")) == [f"done{i}" for i in range(6)]
    assert finished.output == "", finished.output


def test_an_error_in_the_script_ends_the_job_with_its_traceback(tmp_path: Path) -> None:
    finished = run_program(
        """
        with taskplex.Executor("mpi") as executor:
            executor.submit(mpi_tasks.double, 1).result(60)
        raise SystemExit("the script gave up")
        """,
        tmp_path,
        ranks=2,
    )
    assert finished.returncode != 0
    assert "the script gave up" in finished.output


def test_a_module_runs_as_with_python_m(tmp_path: Path) -> None:
    package = tmp_path / "jobs"
    package.mkdir()
    (package / "__init__.py").touch()
    (package / "sweep.py").write_text(
        "import json, os, sys, taskplex, mpi_tasks\n"
        "if __name__ == '__main__':\n"
        "    with taskplex.Executor('mpi') as executor:\n"
        "        results = list(executor.map(mpi_tasks.double, range(5)))\n"
        "    with open(os.environ['MPI_TEST_RESULT'], 'w') as out:\n"
        "        json.dump({'argv': sys.argv[1:], 'results': results}, out)\n"
    )
    reported = succeeded(run_program("", tmp_path, ranks=2, module="jobs.sweep", args=("x",)))
    assert reported == {"argv": ["x"], "results": [0, 2, 4, 6, 8]}
