"""Two hosts for real: broker (and client) in one network namespace, a worker host in another,
joined by a veth pair that the test creates, cuts mid-task and restores. Traffic stays between
those two namespaces; they are deleted at the end. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq_tasks
from conftest import BOUND, HEARTBEAT, gone, kill_tree, python_path, wait_until

from taskplex_zmq.security import generate_keys

pytestmark = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2",
)


def ip(*arguments: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *arguments], check=True, timeout=BOUND, capture_output=True)


@dataclass
class Hosts:
    broker_ns: str
    worker_ns: str
    worker_link: str
    broker_address: str


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    tag = f"tpx{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    made = Hosts(f"{tag}-broker", f"{tag}-worker", f"{tag}w", f"{subnet}.1")
    created: list[str] = []
    try:
        for namespace in (made.broker_ns, made.worker_ns):
            subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=BOUND)
            created.append(namespace)
            ip("link", "set", "lo", "up", namespace=namespace)
        ip("link", "add", f"{tag}b", "netns", made.broker_ns, "type", "veth",
           "peer", "name", made.worker_link, "netns", made.worker_ns)  # fmt: skip
        ip("addr", "add", f"{subnet}.1/30", "dev", f"{tag}b", namespace=made.broker_ns)
        ip("addr", "add", f"{subnet}.2/30", "dev", made.worker_link, namespace=made.worker_ns)
        ip("link", "set", f"{tag}b", "up", namespace=made.broker_ns)
        ip("link", "set", made.worker_link, "up", namespace=made.worker_ns)
        yield made
    finally:
        for namespace in created:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=BOUND)


CLIENT = """
import sys
sys.path[:0] = {path!r}
import taskplex, zmq_tasks
from taskplex import Task
with taskplex.Executor("zmq", address={address!r}, keys={keys!r}, heartbeat=0.2, liveness=5) as ex:
    task = Task(zmq_tasks.hold, ({directory!r}, "t"), retries=1)
    result = ex.submit_task(task).result(timeout=120)
    print(result, task.attempts, flush=True)
"""


def test_a_worker_host_cut_off_mid_task_costs_one_retry(hosts: Hosts, tmp_path: Path) -> None:
    keys = str(generate_keys(tmp_path / "keys"))
    directory = str(tmp_path)
    environment = python_path()
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("broker", "worker")}
    started: list[subprocess.Popen[bytes]] = []

    def run_in(namespace: str, *command: str, **options: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, *command], env=environment, **options
        )  # type: ignore[call-overload]
        started.append(process)
        return process  # type: ignore[no-any-return]

    try:
        broker = run_in(
            hosts.broker_ns, "-m", "taskplex_zmq", "broker", "--bind", f"tcp://{hosts.broker_address}:0",
            "--print-address", "--keys", keys, *HEARTBEAT, stdout=subprocess.PIPE, stderr=logs["broker"],
        )  # fmt: skip
        assert broker.stdout is not None
        address = broker.stdout.readline().decode().strip()
        assert address.startswith(f"tcp://{hosts.broker_address}:"), address
        run_in(
            hosts.worker_ns, "-m", "taskplex_zmq", "worker", "--connect", address, "--keys", keys,
            "--processes", "1", *HEARTBEAT, stderr=logs["worker"],
        )  # fmt: skip
        script = CLIENT.format(path=sys.path, address=address, keys=keys, directory=directory)
        client = run_in(hosts.broker_ns, "-c", textwrap.dedent(script), stdout=subprocess.PIPE)
        wait_until(lambda: zmq_tasks.runs(directory, "t"), "the task to start on the worker host")
        first = zmq_tasks.runs(directory, "t")[0]

        ip("link", "set", hosts.worker_link, "down", namespace=hosts.worker_ns)
        broker_log = tmp_path / "broker.log"
        wait_until(lambda: "lost (was silent" in broker_log.read_text(), "the broker to declare it lost")
        wait_until(lambda: gone([first]), "the cut-off host to stop the task it can no longer report")
        ip("link", "set", hosts.worker_link, "up", namespace=hosts.worker_ns)

        wait_until(lambda: len(zmq_tasks.runs(directory, "t")) == 2, "the retry on the host, back")
        zmq_tasks.release(directory, "t")
        output, _ = client.communicate(timeout=BOUND)
        assert client.returncode == 0
        pid, attempts = output.split()
        assert int(pid) == zmq_tasks.runs(directory, "t")[1]
        assert int(attempts) == 2
    finally:
        for process in started:
            kill_tree(process.pid)
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for log in logs.values():
            log.close()
