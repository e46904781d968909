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
    """Three namespaces: the broker's, joined to a worker host's and to a client's by veth pairs."""

    broker_ns: str
    worker_ns: str
    client_ns: str
    worker_link: str
    client_link: str
    worker_side: str
    """The broker's address on the link to the worker host."""
    client_side: str
    """The broker's address on the link to the client."""


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    tag = f"tpx{os.getpid() % 100000}"
    octet = os.getpid() % 250
    made = Hosts(
        f"{tag}-broker", f"{tag}-worker", f"{tag}-client", f"{tag}w", f"{tag}c",
        f"10.231.{octet}.1", f"10.232.{octet}.1",
    )  # fmt: skip
    created: list[str] = []
    try:
        for namespace in (made.broker_ns, made.worker_ns, made.client_ns):
            subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=BOUND)
            created.append(namespace)
            ip("link", "set", "lo", "up", namespace=namespace)
        for link, namespace, subnet in (
            (made.worker_link, made.worker_ns, f"10.231.{octet}"),
            (made.client_link, made.client_ns, f"10.232.{octet}"),
        ):
            ip("link", "add", f"{link}b", "netns", made.broker_ns, "type", "veth",
               "peer", "name", link, "netns", namespace)  # fmt: skip
            ip("addr", "add", f"{subnet}.1/30", "dev", f"{link}b", namespace=made.broker_ns)
            ip("addr", "add", f"{subnet}.2/30", "dev", link, namespace=namespace)
            ip("link", "set", f"{link}b", "up", namespace=made.broker_ns)
            ip("link", "set", link, "up", namespace=namespace)
        yield made
    finally:
        for namespace in created:  # deleting a namespace deletes its end of the veth pairs
            subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=BOUND)


class Processes:
    """Processes started in the namespaces, with their logs; killed by pid at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []
        self.environment = python_path()

    def run_in(
        self, namespace: str, name: str, *command: str, stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, *command],
                env=self.environment, stdout=stdout, stderr=log,
            )  # fmt: skip
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def start_cluster(self, hosts: Hosts, keys: str) -> int:
        """A broker on every address of its namespace, and a worker host; returns the port."""
        broker = self.run_in(
            hosts.broker_ns, "broker", "-m", "taskplex_zmq", "broker", "--bind", "tcp://*:0",
            "--print-address", "--keys", keys, *HEARTBEAT, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert broker.stdout is not None
        port = int(broker.stdout.readline().decode().strip().rpartition(":")[2])
        self.run_in(
            hosts.worker_ns, "worker", "-m", "taskplex_zmq", "worker", "--connect",
            f"tcp://{hosts.worker_side}:{port}", "--keys", keys, "--processes", "2", *HEARTBEAT,
        )  # fmt: skip
        return port

    def start_everything(self, hosts: Hosts, directory: str, tasks: int) -> subprocess.Popen[bytes]:
        """Keys, a broker, a worker host, and a client running ``tasks`` held tasks t0, t1, ..."""
        keys = str(generate_keys(self.directory / "keys"))
        port = self.start_cluster(hosts, keys)
        address = f"tcp://{hosts.client_side}:{port}"
        script = CLIENT.format(
            path=sys.path, address=address, keys=keys, directory=directory, tasks=tasks
        )
        return self.run_in(
            hosts.client_ns, "client", "-c", textwrap.dedent(script), stdout=subprocess.PIPE
        )

    def stop(self) -> None:
        for process in self.started:
            kill_tree(process.pid)
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    made = Processes(tmp_path)
    try:
        yield made
    finally:
        made.stop()


CLIENT = """
import sys
sys.path[:0] = {path!r}
import taskplex, zmq_tasks
from taskplex import Task
options = dict(address={address!r}, keys={keys!r}, heartbeat=0.2, liveness=5, workers=2)
with taskplex.Executor("zmq", **options) as executor:
    tasks = [Task(zmq_tasks.hold, ({directory!r}, f"t{{i}}"), retries=1) for i in range({tasks})]
    futures = [executor.submit_task(task) for task in tasks]
    for task, future in zip(tasks, futures):
        print(future.result(timeout=120), task.attempts, flush=True)
"""


def test_a_worker_host_cut_off_mid_task_costs_one_retry(
    hosts: Hosts, processes: Processes, tmp_path: Path
) -> None:
    directory = str(tmp_path)
    client = processes.start_everything(hosts, directory, tasks=1)
    wait_until(lambda: zmq_tasks.runs(directory, "t0"), "the task to start on the worker host")
    first = zmq_tasks.runs(directory, "t0")[0]

    ip("link", "set", hosts.worker_link, "down", namespace=hosts.worker_ns)
    wait_until(lambda: "lost (was silent" in processes.log("broker"), "the broker to declare it lost")
    wait_until(lambda: gone([first]), "the cut-off host to stop the task it can no longer report")
    ip("link", "set", hosts.worker_link, "up", namespace=hosts.worker_ns)

    wait_until(lambda: len(zmq_tasks.runs(directory, "t0")) == 2, "the retry on the host, back")
    zmq_tasks.release(directory, "t0")
    output, _ = client.communicate(timeout=BOUND)
    assert client.returncode == 0, processes.log("client")
    assert output.decode().split() == [str(zmq_tasks.runs(directory, "t0")[1]), "2"]


def test_a_client_cut_off_and_back_within_the_grace_period_collects_its_results(
    hosts: Hosts, processes: Processes, tmp_path: Path
) -> None:
    directory = str(tmp_path)
    client = processes.start_everything(hosts, directory, tasks=2)
    wait_until(lambda: all(zmq_tasks.runs(directory, f"t{i}") for i in range(2)), "both tasks to start")
    pids = [zmq_tasks.runs(directory, f"t{i}")[0] for i in range(2)]

    ip("link", "set", hosts.client_link, "down", namespace=hosts.client_ns)
    wait_until(
        lambda: "is silent" in processes.log("broker"), "the broker to notice the client is silent"
    )
    for i in range(2):
        zmq_tasks.release(directory, f"t{i}")
    wait_until(lambda: all(zmq_tasks.done(directory, f"t{i}") for i in range(2)), "both tasks to end")
    ip("link", "set", hosts.client_link, "up", namespace=hosts.client_ns)

    output, _ = client.communicate(timeout=BOUND)
    assert client.returncode == 0, processes.log("client")
    lines = output.decode().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "1"], "each task ran in one attempt"
    # a task whose result was lost with the connection may run again; none is lost or doubled
    assert sorted(int(line.split()[0]) for line in lines) in (
        sorted(pids),
        sorted({*pids, *(zmq_tasks.runs(directory, f"t{i}")[-1] for i in range(2))}),
    )
    assert "did not come back" not in processes.log("broker")
