"""The detached mode under faults: silent worker hosts, clients that vanish or come back, and a
broker killed mid-run. Broker, worker hosts and clients are real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import zmq
import zmq_tasks
from conftest import BOUND, FAST, Cluster, gone, python_path, wait_until

import taskplex
from taskplex import Task, TaskCancelled, TaskTimeout
from taskplex.serialization import dumps_call, loads
from taskplex_zmq import _protocol as p


def test_a_silent_worker_host_is_declared_dead_and_its_late_result_dropped(
    cluster: Cluster, tmp_path: Path
) -> None:
    directory = str(tmp_path)
    first_host = cluster.start_worker()
    with taskplex.Executor("zmq", address=cluster.address, workers=1, **FAST) as executor:
        task = Task(zmq_tasks.hold, (directory, "t"), retries=1)
        future = executor.submit_task(task)
        delivered: list[object] = []
        future.add_done_callback(delivered.append)
        wait_until(lambda: zmq_tasks.runs(directory, "t"), "the task to start")
        first_host.send_signal(signal.SIGSTOP)  # silent: alive, but says nothing any more
        second_host = cluster.start_worker()
        wait_until(lambda: len(zmq_tasks.runs(directory, "t")) == 2, "the retry on the second host")
        zmq_tasks.release(directory, "t")
        second = future.result(timeout=BOUND)
        assert second == zmq_tasks.runs(directory, "t")[1]
        assert psutil.Process(second).parents()[1].pid == second_host.pid
        first_host.send_signal(signal.SIGCONT)
        # Back, the host learns it was declared dead (it drops what it held) or reports its result
        # first (the broker drops it as late); either way it joins again, and nothing is delivered.
        wait_until(
            lambda: (
                "saying hello again" in cluster.log(first_host)
                or "dropped a message (late)" in cluster.log(cluster.broker)
            ),  # type: ignore[arg-type]
            "the host declared dead to rejoin, its late result dropped",
        )
        assert executor.submit(zmq_tasks.noop, 3).result(timeout=BOUND) == 3
        assert task.attempts == 2
        assert len(delivered) == 1


CLIENT = """
import signal, sys, time
sys.path[:0] = {path!r}
import taskplex, zmq_tasks
executor = taskplex.Executor("zmq", address={address!r}, workers=2, heartbeat=0.2, liveness=5)
futures = [executor.submit(zmq_tasks.hold, {directory!r}, f"{prefix}{{i}}") for i in range(2)]
print("submitted", flush=True)
print(sorted(future.result(timeout=120) for future in futures), flush=True)
executor.shutdown()
"""


def start_client(cluster: Cluster, directory: str, prefix: str) -> subprocess.Popen[str]:
    script = CLIENT.format(path=sys.path, address=cluster.address, directory=directory, prefix=prefix)
    client = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=python_path(),
    )
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "submitted"
    return client


def test_a_client_that_vanishes_loses_only_its_own_tasks(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_broker("--grace", "1")
        cluster.start_worker(processes=3)
        directory = str(tmp_path)
        doomed = start_client(cluster, directory, "doomed")
        wait_until(
            lambda: all(zmq_tasks.runs(directory, f"doomed{i}") for i in range(2)),
            "the vanishing client's tasks to start",
        )
        pids = [zmq_tasks.runs(directory, f"doomed{i}")[0] for i in range(2)]
        doomed.kill()
        doomed.wait(BOUND)
        with taskplex.Executor("zmq", address=cluster.address, workers=1, **FAST) as executor:
            assert executor.submit(zmq_tasks.noop, "served").result(timeout=BOUND) == "served"
            wait_until(lambda: gone(pids), "the vanished client's tasks to be stopped after the grace")
            zmq_tasks.release(directory, "mine")
            assert executor.submit(zmq_tasks.hold, directory, "mine").result(timeout=BOUND)
        assert all(len(zmq_tasks.runs(directory, f"doomed{i}")) == 1 for i in range(2))
    finally:
        cluster.stop()


def test_a_client_back_within_the_grace_period_collects_its_results(
    cluster: Cluster, tmp_path: Path
) -> None:
    directory = str(tmp_path)
    cluster.start_worker(processes=2)
    client = start_client(cluster, directory, "t")
    try:
        wait_until(
            lambda: all(zmq_tasks.runs(directory, f"t{i}") for i in range(2)), "both tasks to start"
        )
        client.send_signal(signal.SIGSTOP)
        wait_until(
            lambda: "is silent" in cluster.log(cluster.broker),  # type: ignore[arg-type]
            "the broker to notice the client went silent",
        )
        for i in range(2):
            zmq_tasks.release(directory, f"t{i}")
        pids = [zmq_tasks.runs(directory, f"t{i}")[0] for i in range(2)]
        client.send_signal(signal.SIGCONT)
        output, _ = client.communicate(timeout=BOUND)
        assert client.returncode == 0
        assert output.strip() == str(sorted(pids))
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()


def test_a_broker_killed_mid_run_loses_no_task(cluster: Cluster, tmp_path: Path) -> None:
    directory = str(tmp_path)
    cluster.start_worker(processes=2)
    with taskplex.Executor("zmq", address=cluster.address, workers=2, **FAST) as executor:
        held = [executor.submit(zmq_tasks.hold, directory, f"held{i}") for i in range(2)]
        wait_until(lambda: all(zmq_tasks.runs(directory, f"held{i}") for i in range(2)), "held tasks")
        queued = [executor.submit(zmq_tasks.noop, i) for i in range(200)]
        broker = cluster.broker
        assert broker is not None
        broker.kill()
        broker.wait(BOUND)
        cluster.start_broker()
        for i in range(2):
            zmq_tasks.release(directory, f"held{i}")
        assert [future.result(timeout=BOUND) for future in queued] == list(range(200))
        assert all(isinstance(future.result(timeout=BOUND), int) for future in held)
        assert executor.submit(zmq_tasks.noop, "after").result(timeout=BOUND) == "after"


def test_cancel_and_timeout_stop_the_work_on_the_worker_host(cluster: Cluster, tmp_path: Path) -> None:
    directory = str(tmp_path)
    cluster.start_worker(processes=2)
    with taskplex.Executor("zmq", address=cluster.address, workers=2, **FAST) as executor:
        cancelled = Task(zmq_tasks.hold, (directory, "cancelled"))
        timed_out = Task(zmq_tasks.hold, (directory, "timed_out"), timeout=1.0)
        futures = [executor.submit_task(cancelled), executor.submit_task(timed_out)]
        wait_until(
            lambda: zmq_tasks.runs(directory, "cancelled") and zmq_tasks.runs(directory, "timed_out"),
            "both tasks to start",
        )
        assert cancelled.cancel()
        pids = zmq_tasks.runs(directory, "cancelled") + zmq_tasks.runs(directory, "timed_out")
        wait_until(lambda: gone(pids), "the processes of the cancelled and timed-out tasks to end")
        assert isinstance(futures[1].exception(timeout=BOUND), TaskTimeout)
        assert isinstance(cancelled.exception, TaskCancelled)
        assert not any(zmq_tasks.done(directory, name) for name in ("cancelled", "timed_out"))
        assert executor.submit(zmq_tasks.noop, "next").result(timeout=BOUND) == "next"


def test_a_go_that_never_came_is_asked_for_again(cluster: Cluster) -> None:
    """A worker host starts a task only after its client's GO; if the question (READY) or the
    answer is lost, with a client that was away for a while, the host asks again a heartbeat
    later rather than holding the task forever. The client here is a bare socket that ignores
    the first question."""
    cluster.start_worker(processes=1)
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        client.connect(cluster.address)
        client.send_multipart([p.C_HELLO, p.PROTOCOL_VERSION, p.ORDER_MARK, p.pack_u32(0), b"{}"])

        def receive(kind: bytes) -> list[bytes]:
            deadline = time.monotonic() + BOUND
            while time.monotonic() < deadline:
                if client.poll(100):
                    frames = client.recv_multipart()
                    if frames[0] == kind:
                        return frames
            raise AssertionError(f"no {kind!r} from the broker within {BOUND:g} s")

        receive(p.WELCOME)
        call = dumps_call(zmq_tasks.noop, (42,), {})
        client.send_multipart([p.C_SUBMIT, p.pack_ids([7]), *p.pack_parts(list(call))])
        assert p.unpack_ids(receive(p.READY)[1]) == [7]  # ignored: as if it had been lost
        asked_again = receive(p.READY)
        assert p.unpack_ids(asked_again[1]) == [7]
        client.send_multipart([p.C_GO, p.pack_ids([7]), p.pack_ids([])])
        results = receive(p.RESULTS)
        assert p.unpack_ids(results[1]) == [7]
        assert results[2] == bytes([p.OK])
        assert loads(p.unpack_parts(results[3], results[4], 1)[0]) == 42
        client.send_multipart([p.C_BYE])
    finally:
        client.close()
        context.term()
