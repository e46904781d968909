"""Secure by default: network addresses need keys, unauthenticated peers never get through, and a
broker under a flood of hostile frames counts and drops them and keeps serving."""

from __future__ import annotations

import ast
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.utils.monitor
import zmq_tasks
from conftest import BOUND, FAST, Cluster, python_path

import taskplex
from taskplex import InvalidOption
from taskplex.serialization import dumps_call
from taskplex_zmq import _protocol as p
from taskplex_zmq.security import KeyDirectory, generate_keys, is_loopback


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/broker", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.0.0.1:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://cluster-head:5555", False),
        ("tcp://127.0.0.1;10.0.0.1:5555", False),
    ],
)
def test_what_counts_as_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


@pytest.mark.parametrize("command", [["broker", "--bind"], ["worker", "--connect"]])
def test_a_network_address_without_keys_is_refused_with_the_way_out(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskplex_zmq", *command, "tcp://0.0.0.0:5999"],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=python_path(),
        check=False,
    )
    assert result.returncode == 2
    assert "taskplex zmq keygen" in result.stderr
    assert "--insecure" in result.stderr


def test_a_client_refuses_a_network_broker_without_keys() -> None:
    with pytest.raises(InvalidOption, match="taskplex zmq keygen"):
        taskplex.Executor("zmq", address="tcp://192.0.2.1:5555")


def handshake(address: str, keys: Path | None, garbage: bool = True) -> int:
    """Connect a DEALER to ``address`` (a CURVE client with the peer keys in ``keys``, or a plain
    one), send it garbage (which the broker would count) and return the handshake outcome its
    monitor reports."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        KeyDirectory(keys).configure_peer(dealer)
    monitor = dealer.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    try:
        dealer.connect(address)
        if garbage:
            dealer.send_multipart([b"garbage that the broker would count", b"\x00" * 9])
        assert monitor.poll(BOUND * 1000), "no handshake outcome within the bound"
        return int(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
    finally:
        dealer.disable_monitor()
        monitor.close()
        dealer.close()
        context.term()


def stop_and_read_drops(cluster: Cluster) -> dict[str, int]:
    """Stop the broker (SIGTERM) and read the counts of dropped messages it logs as it exits."""
    broker = cluster.broker
    assert broker is not None
    broker.terminate()
    broker.wait(BOUND)
    found = re.search(r"dropped messages: (\{.*\})", cluster.log(broker))
    return {} if found is None else ast.literal_eval(found.group(1))


def test_with_keys_only_authorized_peers_get_through(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    strangers = generate_keys(tmp_path / "other-keys")
    cluster = Cluster(tmp_path)
    try:
        cluster.start_broker("--keys", str(keys))
        cluster.start_worker(1, "--keys", str(keys))
        assert handshake(cluster.address, keys, garbage=False) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert handshake(cluster.address, None) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert handshake(cluster.address, strangers) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        with taskplex.Executor("zmq", address=cluster.address, keys=keys, **FAST) as executor:
            assert executor.submit(zmq_tasks.noop, "authorized").result(timeout=BOUND) == "authorized"
        assert stop_and_read_drops(cluster) == {}, (
            "a frame of an unauthenticated peer reached the broker"
        )
    finally:
        cluster.stop()


def hostile_messages(rng: random.Random, call: tuple[bytes, bytes]) -> list[list[bytes]]:
    """Messages of many shapes that do not follow the protocol, from a peer that said no HELLO."""
    hello = [p.C_HELLO, p.PROTOCOL_VERSION, p.ORDER_MARK, p.pack_u32(0), b"{}"]
    worker_hello = [p.W_HELLO, p.PROTOCOL_VERSION, p.ORDER_MARK, p.pack_u32(1), b"w"]
    shapes = [
        lambda: [b""],
        lambda: [rng.randbytes(rng.randrange(1, 64))],
        lambda: [
            rng.randbytes(1),
            *(rng.randbytes(rng.randrange(0, 32)) for _ in range(rng.randrange(9))),
        ],
        lambda: hello[: rng.randrange(1, 5)],
        lambda: [*hello[:1], b"\x09", *hello[2:]],
        lambda: [*hello[:2], b"\x00" * 8, *hello[3:]],
        lambda: [*hello[:4], rng.randbytes(20)],
        lambda: [*hello[:4], b'{"x": "not a level"}'],
        lambda: [*hello[:3], b"\x01\x02", hello[4]],
        lambda: [*worker_hello[:3], p.pack_u32(0), b"w"],
        lambda: [*worker_hello[:3], p.pack_u32(1 << 31), b"w"],
        lambda: [p.C_SUBMIT, rng.randbytes(rng.choice([1, 7, 9, 15])), *call],
        lambda: [p.W_RESULTS, p.pack_ids([rng.randrange(1 << 40)]), b"\x00", *p.pack_parts([b"x"])],
        lambda: [p.C_PING],
    ]
    return [rng.choice(shapes)() for _ in range(4000)]


def registered_hostile_messages(rng: random.Random, call: tuple[bytes, bytes]) -> list[list[bytes]]:
    """Messages that break the protocol from a client that said HELLO, ending with replays."""
    shapes = [
        lambda: [p.C_SUBMIT, rng.randbytes(rng.choice([1, 7, 9])), *call],
        lambda: [p.C_SUBMIT, p.pack_ids([1, 2, 3]), *p.pack_parts(list(call))],
        lambda: [p.C_SUBMIT, p.pack_ids([4]), *p.pack_parts(list(call)), b"extra"],
        lambda: [p.C_SUBMIT, p.pack_ids([5]), p.pack_ids([1, 10**9]), b"".join(call)],
        lambda: [p.C_SUBMIT, p.pack_ids([6]), *p.pack_parts(list(call))[:1], b"truncated"],
        lambda: [p.C_ABORT],
        lambda: [p.C_ABORT, rng.randbytes(5)],
        lambda: [p.C_LEVELS, rng.randbytes(12)],
        lambda: [p.C_LEVELS, b"[1, 2]"],
        lambda: [p.W_RESULTS, p.pack_ids([1]), b"\x00", b"x"],
        lambda: [p.C_GO],
        lambda: [p.C_GO, p.pack_ids([1]), rng.randbytes(3)],
        lambda: [p.C_GO, rng.randbytes(9), p.pack_ids([2])],
        lambda: [b"\x00" * rng.randrange(1, 4)],
    ]
    messages = [rng.choice(shapes)() for _ in range(4000)]
    first = [p.C_SUBMIT, p.pack_ids([10**6]), *p.pack_parts(list(call))]
    return [first, *([first] * 1000), *messages]


def registered_worker_messages(rng: random.Random) -> list[list[bytes]]:
    shapes = [
        lambda: [p.W_STARTED, p.pack_ids([1, 2]), p.pack_ids([1])],
        lambda: [p.W_STARTED, rng.randbytes(3), b""],
        lambda: [p.W_RESULTS, p.pack_ids([1, 2]), b"\x00"],
        lambda: [p.W_RESULTS, p.pack_ids([7]), b"\x09", b"x"],
        lambda: [
            p.W_RESULTS,
            p.pack_ids([rng.randrange(1, 1 << 60)]),
            b"\x00",
            *p.pack_parts([b"late"]),
        ],
        lambda: [p.W_RESULTS, p.pack_ids([3]), b"\x00", p.pack_ids([99]), b"short"],
        # RESULTS carrying the starts that followed, with those malformed, or a frame short
        lambda: [p.W_RESULTS, p.pack_ids([4]), b"\x00", *p.pack_parts([b"x"]), rng.randbytes(3), b""],
        lambda: [p.W_RESULTS, p.pack_ids([5]), b"\x00", *p.pack_parts([b"x"]), p.pack_ids([1, 2])],
        lambda: [
            p.W_RESULTS,
            p.pack_ids([6]),
            b"\x00",
            *p.pack_parts([b"x"]),
            p.pack_ids([1, 2]),
            p.pack_ids([1]),
        ],
        lambda: [p.W_READY],
        lambda: [p.W_READY, rng.randbytes(5)],
        lambda: [p.W_READY, p.pack_ids([rng.randrange(1, 1 << 60)])],
        lambda: [p.W_LOGS, p.pack_ids([1, 2]), b"record"],
        lambda: [p.C_SUBMIT, p.pack_ids([1]), b"f", b"a"],
    ]
    return [rng.choice(shapes)() for _ in range(3000)]


def test_hostile_frames_are_counted_and_dropped_and_the_broker_keeps_serving(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    rng = random.Random(20261129)
    call = dumps_call(zmq_tasks.noop, (1,), {})
    try:
        cluster.start_broker("--max-message-size", "65536")
        cluster.start_worker(1)
        host, port = cluster.address.removeprefix("tcp://").rsplit(":", 1)
        context = zmq.Context()
        sent = 0
        try:
            stranger = context.socket(zmq.DEALER)
            client = context.socket(zmq.DEALER)
            worker = context.socket(zmq.DEALER)
            for attacker in (stranger, client, worker):
                attacker.setsockopt(zmq.LINGER, 0)
                attacker.connect(cluster.address)
            client.send_multipart([p.C_HELLO, p.PROTOCOL_VERSION, p.ORDER_MARK, p.pack_u32(0), b"{}"])
            worker.send_multipart([p.W_HELLO, p.PROTOCOL_VERSION, p.ORDER_MARK, p.pack_u32(1), b"fake"])
            for registered in (client, worker):
                assert registered.poll(BOUND * 1000), "no WELCOME from the broker"
                assert registered.recv_multipart()[0] == p.WELCOME
            for attacker, messages in (
                (stranger, hostile_messages(rng, call)),
                (client, registered_hostile_messages(rng, call)),
                (worker, registered_worker_messages(rng)),
            ):
                for message in messages:
                    attacker.send_multipart(message)
                    sent += 1
            oversized = context.socket(zmq.DEALER)
            oversized.setsockopt(zmq.LINGER, 0)
            oversized.connect(cluster.address)
            oversized.send_multipart([p.C_HELLO, rng.randbytes(1 << 20)])
            with socket.create_connection((host, int(port)), timeout=BOUND) as raw:
                raw.sendall(rng.randbytes(1 << 16))  # not even ZMTP
            client.send_multipart([p.C_BYE])
            assert sent >= 10_000
            with taskplex.Executor("zmq", address=cluster.address, workers=1, **FAST) as executor:
                futures = [executor.submit(zmq_tasks.noop, i) for i in range(100)]
                assert [future.result(timeout=BOUND) for future in futures] == list(range(100))
            for attacker in (stranger, client, worker, oversized):
                attacker.close()
        finally:
            context.term()
        broker = cluster.broker
        assert broker is not None
        assert broker.poll() is None, "the broker died under hostile frames"
        drops = stop_and_read_drops(cluster)
        assert drops.get("replayed", 0) >= 1000
        assert drops.get("malformed", 0) >= 5000
        assert sum(drops.values()) >= 10_000, drops
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keys": "keys"}, "keys are for a detached broker"),
        ({"address": "tcp://127.0.0.1:5555", "keys": "/nonexistent"}, "holds no broker.key"),
        ({"address": "127.0.0.1:5555"}, "ZeroMQ endpoint"),
        ({"heartbeat": 0}, "heartbeat"),
        ({"liveness": 1}, "liveness"),
    ],
)
def test_options_are_checked_at_construction(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOption, match=message):
        taskplex.create_server("zmq", **options)
