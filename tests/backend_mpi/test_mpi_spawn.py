"""Spawn mode: ``taskplex.Executor("mpi", workers=N)`` from a plain python."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MPIEXEC, alive, open_mpi, run_program, succeeded, wait_until


def test_tasks_run_on_spawned_ranks_and_keep_their_tracebacks(tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            """
            with taskplex.Executor("mpi", workers=2, mode="spawn") as executor:
                results = list(executor.map(mpi_tasks.double, range(50)))
                where = {tuple(executor.submit(mpi_tasks.where).result(60)) for _ in range(20)}
                try:
                    executor.submit(mpi_tasks.fail, "boom").result(60)
                except ValueError as exc:
                    error = [type(exc).__name__, str(exc), repr(exc.__cause__)]
            report(results=results, pids=sorted(pid for pid, _ in where), me=os.getpid(), error=error)
            """,
            tmp_path,
        )
    )
    assert reported["results"] == [2 * x for x in range(50)]
    assert reported["me"] not in reported["pids"]
    assert 1 <= len(reported["pids"]) <= 2
    kind, message, cause = reported["error"]
    assert (kind, message) == ("ValueError", "boom")
    assert "RemoteTraceback" in cause, cause
    assert "in fail" in cause, cause


def test_spawns_leave_no_session_files_and_are_not_tripped_by_stale_ones(tmp_path: Path) -> None:
    # A spawn's process manager is killed when its job ends and leaves its session files in
    # TMPDIR. Open MPI's prte keeps them in prte.<its pid>, and a later prte that gets a recycled
    # pid finds the stale files there and cannot start its PMIx listener: the spawn fails with
    # MPI_ERR_UNKNOWN. Here every pid the next spawns can get has such a stale directory.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    reported = succeeded(
        run_program(
            """
            import socket, tempfile
            scratch = os.environ["TMPDIR"]
            host = socket.gethostname()
            last = int(open("/proc/sys/kernel/ns_last_pid").read())
            for pid in range(last + 1, last + 2000):
                stale = os.path.join(scratch, f"prte.{pid}")
                os.mkdir(stale)
                for name in ("pmix.{}.tool", "pmix.{}.tool.{}", "pmix.{}.tool.prte-vm-{}@0"):
                    with open(os.path.join(stale, name.format(host, pid)), "w") as out:
                        out.write(f"prte-vm-{pid}@0.0;tcp4://127.0.0.1:1\\n")
            before = sorted(os.listdir(scratch))
            for round in range(2):
                with taskplex.Executor("mpi", workers=1, mode="spawn") as executor:
                    seen = executor.submit(tempfile.gettempdir).result(60)
            report(left=sorted(set(os.listdir(scratch)) - set(before)), seen=seen, scratch=scratch)
            """,
            work,
            env={"TMPDIR": str(scratch)},
        )
    )
    assert reported["left"] == [], "the spawns left files in TMPDIR"
    assert reported["seen"] == reported["scratch"], "a task saw the host's TMPDIR, not the caller's"


def test_a_task_is_running_only_once_its_rank_starts_it(tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            """
            def until(condition, what):
                deadline = time.monotonic() + 60
                while not condition():
                    assert time.monotonic() < deadline, what
                    time.sleep(0.01)

            with taskplex.Executor("mpi", workers=1, mode="spawn") as executor:
                first = executor.submit(mpi_tasks.touch_then_wait, "a.started", "a.gate")
                second = executor.submit(mpi_tasks.touch_then_wait, "b.started", "b.gate")
                until(lambda: os.path.exists("a.started") and first.running(), "first running")
                second_waiting = not second.running() and not os.path.exists("b.started")
                open("a.gate", "w").close()
                until(lambda: os.path.exists("b.started"), "second started")
                until(second.running, "second reported running")
                open("b.gate", "w").close()
                results = [first.result(60), second.result(60)]
            report(second_waiting=second_waiting, results=results)
            """,
            tmp_path,
        )
    )
    assert reported["second_waiting"], "a task waiting for the busy rank was reported running"
    assert reported["results"] == ["", ""]


def test_a_timed_out_task_is_delivered_at_once_and_its_rank_serves_on_after_it(
    tmp_path: Path,
) -> None:
    reported = succeeded(
        run_program(
            """
            task = taskplex.Task(mpi_tasks.sleep_then_mark, ("gate", "marker"), timeout=0.5)
            with taskplex.Executor("mpi", workers=1, mode="spawn", prefetch=0) as executor:
                timed_out = executor.submit_task(task)
                error = type(timed_out.exception(60)).__name__
                still_running = not os.path.exists("marker")
                open("gate", "w").close()
                after = executor.submit(os.path.exists, "marker").result(60)
            report(error=error, still_running=still_running, after=after)
            """,
            tmp_path,
        )
    )
    assert reported["error"] == "TaskTimeout"
    assert reported["still_running"], "the task ended before its timeout was delivered"
    assert reported["after"], "the next task ran on the rank before the timed-out call returned"


def test_cancel_withdraws_a_task_waiting_for_a_rank_without_prefetch(tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            """
            with taskplex.Executor("mpi", workers=1, mode="spawn", prefetch=0) as executor:
                first = executor.submit(mpi_tasks.touch_then_wait, "a.started", "a.gate")
                second = executor.submit(mpi_tasks.touch_then_wait, "b.started", "b.gate")
                mpi_tasks.wait_for_file("a.started")
                cancelled = second.cancel()
                open("a.gate", "w").close()
                open("b.gate", "w").close()
                first.result(60)
            report(cancelled=cancelled, ran=os.path.exists("b.started"))
            """,
            tmp_path,
        )
    )
    assert reported == {"cancelled": True, "ran": False}


def test_spawning_with_another_mpis_mpiexec_is_refused_with_the_fix(tmp_path: Path) -> None:
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'HYDRA build details:'\necho '    Version: 3.9.9'\n")
    fake.chmod(0o755)
    reported = succeeded(
        run_program(
            f"""
            from taskplex_mpi import spawning
            try:
                taskplex.Executor("mpi", workers=1, mode="spawn", mpiexec={str(fake)!r})
            except taskplex.BackendUnavailable as exc:
                error = str(exc)
            report(error=error, library=list(spawning.library()))
            """,
            tmp_path,
        )
    )
    family, version = reported["library"]
    assert "3.9.9" in reported["error"]
    assert f"{family} {version}" in reported["error"]
    assert "PATH" in reported["error"]
    assert "mpiexec=" in reported["error"]


def test_a_rank_of_a_plain_mpiexec_job_is_told_to_use_the_launcher(tmp_path: Path) -> None:
    finished = run_program(
        """
        from mpi4py import MPI
        try:
            taskplex.Executor("mpi", workers=1)
        except taskplex.BackendUnavailable as exc:
            if MPI.COMM_WORLD.Get_rank() == 0:
                report(error=str(exc))
        """,
        tmp_path,
        ranks=2,
        launcher=False,
    )
    assert "python -m taskplex_mpi" in succeeded(finished)["error"]


def test_a_dead_rank_costs_its_task_but_not_the_caller(tmp_path: Path) -> None:
    reported = succeeded(
        run_program(
            """
            import signal
            with taskplex.Executor("mpi", workers=2, mode="spawn") as executor:
                doomed = executor.submit(mpi_tasks.touch_then_wait, "started", "never")
                os.kill(int(mpi_tasks.wait_for_file("started")), signal.SIGKILL)
                error = doomed.exception(60)
                after = list(executor.map(mpi_tasks.double, range(10)))
            report(error=[type(error).__name__, str(error)], after=after)
            """,
            tmp_path,
        )
    )
    kind, message = reported["error"]
    assert kind == "WorkerLost"
    assert "a rank died" in message
    assert reported["after"] == [2 * x for x in range(10)]


def test_ranks_end_with_a_caller_killed_by_sigkill(tmp_path: Path) -> None:
    finished = run_program(
        """
        import signal
        executor = taskplex.Executor("mpi", workers=2, mode="spawn")
        pids = {executor.submit(mpi_tasks.where).result(60)[0] for _ in range(10)}
        executor.submit(mpi_tasks.touch_then_wait, "started", "never")
        mpi_tasks.wait_for_file("started")
        report(pids=sorted(pids))
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    assert finished.returncode == -9
    pids = finished.reported["pids"]
    assert pids
    wait_until(lambda: not any(alive(pid) for pid in pids), f"ranks {pids} to end")


def test_a_spawn_that_hangs_fails_within_spawn_timeout(tmp_path: Path) -> None:
    if open_mpi():
        pytest.skip("Open MPI spawns through the prte of its installation, not an mpiexec on PATH")
    # the right MPI's version, but a process manager that never starts the ranks
    fake = tmp_path / "bin" / "mpiexec"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then exec {MPIEXEC} --version; fi\nexec sleep 600\n'
    )
    fake.chmod(0o755)
    finished = run_program(
        f"""
        try:
            taskplex.Executor("mpi", workers=1, mode="spawn", mpiexec={str(fake)!r}, spawn_timeout=5)
        except taskplex.BackendError as exc:
            report(error=str(exc))
        """,
        tmp_path,
    )
    error = succeeded(finished)["error"]
    assert "did not finish within 5.0 s" in error
    assert "spawn_timeout" in error
