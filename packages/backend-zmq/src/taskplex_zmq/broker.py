"""The broker: one ROUTER socket that clients and worker hosts connect to, and a queue per client.

Data flow (one thread, one poll loop; nothing here unpickles anything)::

    client ── SUBMIT ids + payloads ──► per-client queue ──► dispatch: round robin over clients,
                                                             │ up to each worker's free capacity
                                                             ▼ (and each client's limit)
    client ◄── STARTED / RESULTS / LOGS ◄── worker host ◄── TASKS keys + payloads, CANCEL keys

**Ids.** A client names its tasks by its attempt ids; the broker gives every task it accepts a
key of its own and tells worker hosts only keys. A result is accepted only from the worker host
the task is assigned to, once: a late result (from a worker host declared dead, or after the task
was handed elsewhere) is counted and dropped.

**Heartbeats.** The broker pings every peer each ``heartbeat`` seconds, and every peer pings it.
A worker host silent for ``heartbeat * liveness`` seconds is declared dead: the tasks it had
started are reported LOST to their clients (which retry them within their ``retries``), and those
it held unstarted go back to the front of their client's queue. A client silent that long is
detached: its tasks keep running and their results are kept; if it is heard again within
``grace`` seconds it gets them, otherwise its tasks are cancelled and forgotten. Other clients
are not affected by either.

**Hostile input.** Every message is checked against :mod:`taskplex_zmq._protocol` before it
changes anything; one that does not fit is counted by reason and dropped.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from taskplex_zmq import _protocol as p

__all__ = ["Broker"]

logger = logging.getLogger("taskplex.zmq.broker")

DRAIN = 512
"""Most messages read per wake-up before the broker dispatches and sends what they caused."""
FAIR_SHARE = 64
"""Most tasks of one client dispatched before the next client's turn."""
LOGGED_DROPS = 10
"""Dropped messages of each reason logged at INFO; the rest are only counted."""


class _Job:
    __slots__ = ("aborted", "arguments", "attempt", "client", "function", "started", "worker")

    def __init__(self, client: _Client, attempt: int, function: bytes, arguments: bytes) -> None:
        self.client = client
        self.attempt = attempt
        self.function = function
        self.arguments = arguments
        self.worker: _Worker | None = None
        self.started = False
        self.aborted = False


class _Client:
    __slots__ = (
        "attempts",
        "detached_at",
        "identity",
        "in_flight",
        "last_seen",
        "limit",
        "queue",
        "ready",
        "unsent",
    )

    def __init__(self, identity: bytes, limit: int, now: float) -> None:
        self.identity = identity
        self.limit = limit
        self.queue: deque[int] = deque()
        self.attempts: dict[int, int] = {}  # attempt id -> key, for every task not yet reported
        self.in_flight = 0
        self.ready = False
        self.last_seen = now
        self.detached_at: float | None = None
        self.unsent: list[tuple[int, int, bytes]] = []  # results kept while it is away


class _Worker:
    __slots__ = ("capacity", "held", "identity", "last_seen", "name")

    def __init__(self, identity: bytes, name: str, capacity: int, now: float) -> None:
        self.identity = identity
        self.name = name
        self.capacity = capacity
        self.held: set[int] = set()
        self.last_seen = now


class Broker:
    """Route tasks from clients to worker hosts over ``socket`` (a bound ROUTER); see the module."""

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        *,
        heartbeat: float = 0.5,
        liveness: int = 6,
        grace: float = 60.0,
    ) -> None:
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket = socket
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.grace = grace
        self.incarnation = os.urandom(8)
        self.dropped: collections.Counter[str] = collections.Counter()
        """Messages dropped, by reason: malformed ones, replays, late results."""
        self.clients: dict[bytes, _Client] = {}
        self.workers: dict[bytes, _Worker] = {}
        self.jobs: dict[int, _Job] = {}
        self.levels = p.pack_json({})
        self._next_key = 1
        self._ready: deque[_Client] = deque()
        self._started: dict[tuple[_Client, str], tuple[list[int], list[int]]] = {}
        self._results: dict[_Client, list[tuple[int, int, bytes]]] = {}
        self._logs: dict[_Client, list[bytes]] = {}
        self._cancels: dict[_Worker, list[int]] = {}
        self._asks: dict[_Client, list[int]] = {}  # READY to clients: attempt ids
        self._gos: dict[_Worker, list[int]] = {}  # GO to worker hosts: keys
        self._stopping = False
        self._handlers: dict[bytes, Callable[[bytes, list[bytes], float], None]] = {
            p.C_HELLO: self._client_hello,
            p.W_HELLO: self._worker_hello,
        }
        self._client_handlers: dict[bytes, Callable[[_Client, list[bytes]], None]] = {
            p.C_SUBMIT: self._submit,
            p.C_ABORT: self._abort,
            p.C_GO: self._go,
            p.C_LEVELS: self._set_levels,
            p.C_PING: lambda client, frames: None,
            p.C_BYE: self._bye,
        }
        self._worker_handlers: dict[bytes, Callable[[_Worker, list[bytes]], None]] = {
            p.W_STARTED: self._worker_started,
            p.W_RESULTS: self._worker_results,
            p.W_LOGS: self._worker_logs,
            p.W_READY: self._worker_ready,
            p.W_PING: lambda worker, frames: None,
        }

    # ================================================================== the loop

    def stop(self) -> None:
        """Make :meth:`run` return at its next wake-up; safe from a signal handler."""
        self._stopping = True

    def run(self, watch_fd: int | None = None) -> None:
        """Serve until :meth:`stop`, SIGTERM/SIGINT, or end of file on ``watch_fd`` (a parent's pipe)."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if watch_fd is not None:
            poller.register(watch_fd, zmq.POLLIN)
        next_beat = time.monotonic()
        socket = self.socket
        while not self._stopping:
            timeout = max(0.0, next_beat - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000)))
            if watch_fd is not None and watch_fd in events and not os.read(watch_fd, 4096):
                break  # the process that started this broker is gone
            if socket in events:
                for _ in range(DRAIN):
                    frames = p.receive(socket)
                    if frames is None:
                        break
                    self._handle(frames)
                self._dispatch()
                self._flush()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat
                self._beat(now)
                self._flush()
        if self.dropped:
            logger.warning("dropped messages: %s", dict(self.dropped))

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < len(("identity", "kind")) or not frames[1]:
            self._drop("empty")
            return
        identity, kind, body = frames[0], frames[1], frames[1:]
        now = time.monotonic()
        try:
            client = self.clients.get(identity)
            if client is not None:
                handler = self._client_handlers.get(kind)
                if handler is None:
                    if kind == p.C_HELLO:
                        self._client_hello(identity, body, now)
                        return
                    raise p.Malformed(f"kind {kind[:8]!r} from a client")
                self._heard_client(client, now)
                handler(client, body)
                return
            worker = self.workers.get(identity)
            if worker is not None:
                worker_handler = self._worker_handlers.get(kind)
                if kind == p.W_HELLO:  # it dropped what it held (it lost touch with this broker)
                    self._lost(worker, "joined again")
                    self._worker_hello(identity, body, now)
                    return
                if worker_handler is None:
                    raise p.Malformed(f"kind {kind[:8]!r} from a worker host")
                worker.last_seen = now
                worker_handler(worker, body)
                return
            hello = self._handlers.get(kind)
            if hello is not None:
                hello(identity, body, now)
            elif kind in p.CLIENT_KINDS or kind in p.WORKER_KINDS:
                if kind == p.W_RESULTS:
                    self._drop("late", p.Malformed("results from a worker host declared dead"))
                else:
                    self._drop("unknown peer", p.Malformed(f"kind {kind!r} before HELLO"))
                self._send(identity, [p.UNKNOWN])  # a peer declared dead, or of a previous broker
            else:
                raise p.Malformed(f"kind {kind[:8]!r} from an unknown peer")
        except p.Malformed as exc:
            self._drop("malformed", exc)
        except Exception as exc:  # a message that broke an assumption must not stop the broker
            self._drop("unexpected", exc)

    def _drop(self, reason: str, exc: BaseException | None = None) -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] <= LOGGED_DROPS or logger.isEnabledFor(logging.DEBUG):
            logger.info("dropped a message (%s): %s", reason, exc)

    def _send(self, identity: bytes, frames: list[bytes]) -> bool:
        try:
            p.send(self.socket, [identity, *frames], block=False)
        except zmq.ZMQError:  # gone (EHOSTUNREACH) or not reading (EAGAIN)
            return False
        return True

    # ================================================================== clients

    def _client_hello(self, identity: bytes, frames: list[bytes], now: float) -> None:
        p.check_hello(frames, 5)
        limit = p.unpack_u32(frames[3])
        levels = frames[4]
        p.unpack_levels(levels)
        client = self.clients.get(identity)
        if client is None:
            client = self.clients[identity] = _Client(identity, limit, now)
        else:
            client.limit = limit
            self._heard_client(client, now)
        self._set_levels(client, [p.C_LEVELS, levels])
        self._send(identity, [p.WELCOME, self.incarnation])
        self._make_ready(client)

    def _heard_client(self, client: _Client, now: float) -> None:
        client.last_seen = now
        if client.detached_at is not None:
            client.detached_at = None
            logger.info("client %s is back", client.identity.hex())
        if client.unsent:
            unsent, client.unsent = client.unsent, []
            self._results.setdefault(client, []).extend(unsent)

    def _submit(self, client: _Client, frames: list[bytes]) -> None:
        p.expect(frames, 4, "SUBMIT")
        ids = p.unpack_ids(frames[1])
        parts = p.unpack_parts(frames[2], frames[3], 2 * len(ids))
        jobs, attempts, queue = self.jobs, client.attempts, client.queue
        key = self._next_key
        for index, attempt in enumerate(ids):
            if attempt in attempts:
                self.dropped["replayed"] += 1
                continue
            jobs[key] = _Job(client, attempt, parts[2 * index], parts[2 * index + 1])
            attempts[attempt] = key
            queue.append(key)
            key += 1
        self._next_key = key
        self._make_ready(client)

    def _abort(self, client: _Client, frames: list[bytes]) -> None:
        p.expect(frames, 2, "ABORT")
        self._abort_ids(client, p.unpack_ids(frames[1]))

    def _go(self, client: _Client, frames: list[bytes]) -> None:
        """The client's answer to READY: tasks that may start, and tasks that may not."""
        p.expect(frames, 3, "GO")
        go, refused = p.unpack_ids(frames[1]), p.unpack_ids(frames[2])
        jobs, gos = self.jobs, self._gos
        for attempt in go:
            key = client.attempts.get(attempt)
            if key is None:
                continue  # already reported
            job = jobs[key]
            if job.worker is not None and not job.aborted:
                gos.setdefault(job.worker, []).append(key)
        self._abort_ids(client, refused)

    def _abort_ids(self, client: _Client, attempts: list[int]) -> None:
        for attempt in attempts:
            key = client.attempts.get(attempt)
            if key is None:
                continue  # already reported
            job = self.jobs[key]
            if job.aborted:
                continue
            job.aborted = True
            if job.worker is None:  # still queued here: it never starts
                self._finish(key, job, p.UNSTARTED, b"")
            else:
                self._cancels.setdefault(job.worker, []).append(key)

    def _set_levels(self, client: _Client, frames: list[bytes]) -> None:
        p.expect(frames, 2, "LEVELS")
        p.unpack_levels(frames[1])
        self.levels = frames[1]
        for worker in self.workers.values():
            self._send(worker.identity, [p.LEVELS, self.levels])

    def _bye(self, client: _Client, frames: list[bytes]) -> None:
        self._forget(client)

    def _forget(self, client: _Client) -> None:
        """Cancel a client's tasks and forget it (it left, or stayed away past the grace period)."""
        for key in list(client.attempts.values()):
            job = self.jobs.pop(key)
            if job.worker is not None:
                job.worker.held.discard(key)
                self._cancels.setdefault(job.worker, []).append(key)
        client.attempts.clear()
        client.queue.clear()
        self.clients.pop(client.identity, None)
        self._results.pop(client, None)
        self._logs.pop(client, None)
        for pair in [pair for pair in self._started if pair[0] is client]:
            del self._started[pair]
        self._asks.pop(client, None)

    def _make_ready(self, client: _Client) -> None:
        if not client.ready and client.queue and (not client.limit or client.in_flight < client.limit):
            client.ready = True
            self._ready.append(client)

    # ================================================================== worker hosts

    def _worker_hello(self, identity: bytes, frames: list[bytes], now: float) -> None:
        p.check_hello(frames, 5)
        capacity = p.unpack_u32(frames[3])
        if not 0 < capacity <= p.MAX_BATCH:
            raise p.Malformed(f"a worker capacity of {capacity}")
        name = frames[4].decode("utf-8", "replace")[:200]
        self.workers[identity] = _Worker(identity, name, capacity, now)
        self._send(identity, [p.WELCOME, self.incarnation, self.levels])
        logger.info("worker host %s joined with capacity %d", name, capacity)

    def _held_job(self, worker: _Worker, key: int) -> _Job | None:
        if key not in worker.held:  # from a worker declared dead, or of a task handed elsewhere
            self._drop("late", p.Malformed(f"worker host {worker.name} does not hold task {key}"))
            return None
        return self.jobs[key]

    def _worker_started(self, worker: _Worker, frames: list[bytes]) -> None:
        p.expect(frames, 3, "STARTED")
        keys = p.unpack_ids(frames[1])
        pids = p.unpack_ids(frames[2])
        if len(pids) != len(keys):
            raise p.Malformed(f"STARTED of {len(keys)} keys and {len(pids)} pids")
        for key, pid in zip(keys, pids, strict=True):
            job = self._held_job(worker, key)
            if job is None or job.started:
                continue
            job.started = True
            ids, task_pids = self._started.setdefault((job.client, worker.name), ([], []))
            ids.append(job.attempt)
            task_pids.append(pid)

    def _worker_ready(self, worker: _Worker, frames: list[bytes]) -> None:
        """The worker host would start these: ask their clients (see GO)."""
        p.expect(frames, 2, "READY")
        asks = self._asks
        for key in p.unpack_ids(frames[1]):
            job = self._held_job(worker, key)
            if job is not None and not job.aborted:  # else its CANCEL is on the way
                asks.setdefault(job.client, []).append(job.attempt)

    def _worker_results(self, worker: _Worker, frames: list[bytes]) -> None:
        if len(frames) == p.RESULTS_FRAMES + 2:  # with the starts that followed: STARTED's frames
            self._worker_started(worker, [p.W_STARTED, *frames[p.RESULTS_FRAMES :]])
            frames = frames[: p.RESULTS_FRAMES]
        p.expect(frames, p.RESULTS_FRAMES, "RESULTS")
        keys = p.unpack_ids(frames[1])
        flags = frames[2]
        if len(flags) != len(keys):
            raise p.Malformed(f"RESULTS of {len(keys)} keys and {len(flags)} flags")
        payloads = p.unpack_parts(frames[3], frames[4], len(keys))
        if not set(flags) <= p.FLAGS:
            raise p.Malformed("RESULTS with an unknown flag")
        for index, key in enumerate(keys):
            job = self._held_job(worker, key)
            if job is None:
                continue
            flag = flags[index]
            worker.held.discard(key)
            job.client.in_flight -= 1
            if flag == p.UNSTARTED and not job.aborted:
                self._requeue(key, job)  # the worker host gave it back (it is stopping)
            else:
                self._finish(key, job, flag, payloads[index])
            self._make_ready(job.client)

    def _worker_logs(self, worker: _Worker, frames: list[bytes]) -> None:
        keys = p.unpack_ids(frames[1]) if len(frames) > 1 else []
        if len(frames) != 2 + len(keys):
            raise p.Malformed(f"LOGS of {len(keys)} keys in {len(frames)} frames")
        for index, key in enumerate(keys):
            job = self.jobs.get(key)
            if job is not None and key in worker.held:
                self._logs.setdefault(job.client, []).append(frames[2 + index])

    def _lost(self, worker: _Worker, reason: str) -> None:
        """A worker host is gone: what it started is LOST, what it held goes back to the queue."""
        self.workers.pop(worker.identity, None)
        self._cancels.pop(worker, None)
        self._gos.pop(worker, None)
        logger.warning(
            "worker host %s lost (%s) holding %d task(s)", worker.name, reason, len(worker.held)
        )
        message = f"worker host {worker.name} {reason}".encode()
        for key in sorted(worker.held, reverse=True):
            job = self.jobs[key]
            job.client.in_flight -= 1
            if job.started:
                self._finish(key, job, p.LOST, message)
            elif job.aborted:
                self._finish(key, job, p.UNSTARTED, b"")
            else:
                self._requeue(key, job)
            self._make_ready(job.client)
        worker.held.clear()

    def _requeue(self, key: int, job: _Job) -> None:
        job.worker = None
        job.client.queue.appendleft(key)
        self._make_ready(job.client)

    def _finish(self, key: int, job: _Job, flag: int, payload: bytes) -> None:
        del self.jobs[key]
        client = job.client
        client.attempts.pop(job.attempt, None)
        self._results.setdefault(client, []).append((job.attempt, flag, payload))

    # ================================================================== dispatch and sending

    def _dispatch(self) -> None:
        ready = self._ready
        if not ready:
            return
        jobs, asks = self.jobs, self._asks
        for worker in sorted(self.workers.values(), key=lambda w: len(w.held) - w.capacity):
            free = worker.capacity - len(worker.held)
            if free <= 0 or not ready:
                continue
            keys: list[int] = []
            parts: list[bytes] = []
            while free > 0 and ready:
                client = ready.popleft()
                share = min(free, FAIR_SHARE)
                if client.limit:
                    share = min(share, client.limit - client.in_flight)
                queue = client.queue
                while share > 0 and queue:
                    key = queue.popleft()
                    job = jobs.get(key)
                    if job is None or job.worker is not None:
                        continue  # aborted while queued
                    job.worker = worker
                    worker.held.add(key)
                    client.in_flight += 1
                    # the worker host waits for the client's GO: ask the client now, in the
                    # same turn, rather than when the host has the task (see READY)
                    asks.setdefault(client, []).append(job.attempt)
                    keys.append(key)
                    parts.append(job.function)
                    parts.append(job.arguments)
                    share -= 1
                    free -= 1
                client.ready = False
                self._make_ready(client)
            if keys:
                frames = [p.TASKS, p.pack_ids(keys), *p.pack_parts(parts)]
                if not self._send(worker.identity, frames):
                    self._lost(worker, "stopped reading")

    def _flush(self) -> None:
        for worker, keys in self._gos.items():  # before any CANCEL of the same keys
            self._send(worker.identity, [p.GO, p.pack_ids(keys)])
        self._gos.clear()
        for client, attempts in self._asks.items():
            self._send(client.identity, [p.READY, p.pack_ids(attempts)])
        self._asks.clear()
        for worker, keys in self._cancels.items():
            self._send(worker.identity, [p.CANCEL, p.pack_ids(keys)])
        self._cancels.clear()
        starts: dict[_Client, list[bytes]] = {}
        for (client, name), (ids, pids) in self._started.items():
            starts.setdefault(client, []).extend((p.pack_ids(ids), name.encode(), p.pack_ids(pids)))
        self._started.clear()
        for client, records in self._logs.items():
            self._send(client.identity, [p.LOGS, *records])
        self._logs.clear()
        for client, results in self._results.items():
            frames = [
                p.RESULTS,
                p.pack_ids([r[0] for r in results]),
                bytes(r[1] for r in results),
                *p.pack_parts([r[2] for r in results]),
                *starts.pop(client, ()),  # one message for both: one wake-up of the client
            ]
            if not self._send(client.identity, frames):
                client.unsent.extend(results)  # it is away: kept for its return
        self._results.clear()
        for client, started in starts.items():
            self._send(client.identity, [p.STARTED, *started])

    def _beat(self, now: float) -> None:
        deadline = now - self.heartbeat * self.liveness
        ping = [p.PING, self.incarnation]
        for worker in list(self.workers.values()):
            if worker.last_seen < deadline:
                self._lost(worker, f"was silent for {now - worker.last_seen:.1f} s")
            elif not self._send(worker.identity, ping):
                self._lost(worker, "is unreachable")
        for client in list(self.clients.values()):
            if client.last_seen < deadline and client.detached_at is None:
                client.detached_at = now
                logger.warning(
                    "client %s is silent; its results are kept for %g s",
                    client.identity.hex(),
                    self.grace,
                )
            if client.detached_at is not None and now - client.detached_at > self.grace:
                logger.warning(
                    "client %s did not come back; its tasks are cancelled", client.identity.hex()
                )
                self._forget(client)
                continue
            self._send(client.identity, ping)
        self._dispatch()


def serve(socket: zmq.Socket[bytes], *, watch_fd: int | None = None, **options: Any) -> Broker:
    """Run a broker on ``socket`` until SIGTERM, SIGINT or end of file on ``watch_fd``."""
    broker = Broker(socket, **options)
    previous = {
        signum: signal.signal(signum, lambda signum, frame: broker.stop())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        broker.run(watch_fd)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return broker
