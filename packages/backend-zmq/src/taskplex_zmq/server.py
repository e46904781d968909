"""ZmqServer: tasks go through a ZeroMQ broker to worker hosts, local or on other machines.

Data flow, on the server's event loop except the first line::

    submit (caller's thread) ── prepare(): the call is pickled, or SerializationError names why not
    TaskServer ── launch([attempt, ...]) ──► outbox ──► _flush(): one SUBMIT message per loop turn
                                                          │ DEALER ─► broker (see taskplex_zmq.broker)
                                                          ▼           ─► worker host ─► task process
    attempt.started / succeeded / failed / give_back ◄── _readable(): STARTED, RESULTS, LOGS

**Embedded** (no ``address``): ``start`` runs a broker and one worker host with ``workers`` task
processes as child processes of this one, on loopback; they end when the server stops, and also
when this process dies (they watch a pipe from it). A worker host that dies is replaced.
**Detached** (``address="tcp://host:port"``): the server is a client of a broker started with
``taskplex zmq broker``; the broker runs at most ``workers`` of this client's tasks at once.

**Stopping work.** A cancel or timeout reaches the worker host as a message, which has the mp
backend kill the task's process (group). In the embedded mode the task process is on this machine,
so it is also killed here at once, before the cancelled task is delivered.

**Faults.** A task process that dies fails its task with WorkerLost (retried within ``retries``);
a worker host that dies or goes silent is detected by the broker's heartbeats within ``heartbeat *
liveness`` seconds and its started tasks fail the same way. A restarted broker, noticed by its new
incarnation id, gets every task this client has not seen finish submitted again: nothing that
was submitted is lost, and a task that was running when the broker died may run twice (the first
result counts). A client that was out of touch with its broker (a network cut) and hears it
again submits its unreported tasks again after the results the broker kept for it have arrived:
the broker ignores those it still has, and one whose result was lost with the connection runs
again. Results from an attempt that is over are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import zmq

from taskplex import Capabilities, Task, TaskServer
from taskplex.backend import Attempt, Backend, BackendContext
from taskplex.errors import (
    BackendError,
    BackendUnavailable,
    InvalidOption,
    ResultUnreadable,
    WorkerLost,
    restore_exception,
)
from taskplex.remote_logging import LevelWatch, emit_record, unpack_record
from taskplex.serialization import dumps_call, loads
from taskplex_zmq import _protocol as p
from taskplex_zmq._local import EMBEDDED_PREFETCH, START_TIMEOUT, LocalProcesses
from taskplex_zmq.security import InsecureAddress, KeyDirectory, check_address

__all__ = ["ZmqBackend", "ZmqServer"]

logger = logging.getLogger("taskplex.zmq")

DETACHED_PREFETCH = 64
"""Most tasks a client keeps queued at a shared broker beyond ``workers``."""
PIPELINE_WINDOW = 0.02
"""Seconds of work per worker launched ahead of time, so that task processes never wait for a
round trip between short tasks. Tasks longer than that are not launched ahead at all."""
_SMOOTHING = 0.1
MIN_LIVENESS = 2
"""A peer is declared gone only after missing more than one ping."""
RESTARTS = 5
"""Local worker hosts started in a row that die at once, after which the server gives up."""


EMBEDDED_CAPABILITIES = Capabilities(
    cancel_running=True,
    timeout_kills_work=True,
    survives_worker_death=True,
    remote=True,
    worker_processes=True,
    forwards_logs=True,
)
DETACHED_CAPABILITIES = replace(EMBEDDED_CAPABILITIES, worker_processes=False)


def _check_number(name: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise InvalidOption(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


class ZmqBackend(Backend):
    """Send tasks through a ZeroMQ broker; see the module docstring for the two modes.

    Options: ``address`` (a broker's ``tcp://host:port``; None: start one here), ``keys`` (the
    directory of ``taskplex zmq keygen``; required beyond loopback unless ``insecure=True``, see
    :mod:`taskplex_zmq.security`), ``heartbeat`` (seconds between pings) and ``liveness`` (pings
    missed before a peer counts as gone).
    """

    capabilities = EMBEDDED_CAPABILITIES
    """Detached, task processes are not this process's children: no ``worker_processes``."""

    def __init__(
        self,
        *,
        address: str | None = None,
        keys: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        heartbeat: float = 0.5,
        liveness: int = 6,
    ) -> None:
        if address is not None and (not isinstance(address, str) or "://" not in address):
            raise InvalidOption(
                f"address must be a ZeroMQ endpoint like 'tcp://host:5555', got {address!r}"
            )
        if address is not None:
            try:
                check_address(address, keys, insecure, "connect to")
            except InsecureAddress as exc:
                raise InvalidOption(str(exc)) from None
        self._keys = None
        if keys is not None and address is None:
            raise InvalidOption(
                "keys are for a detached broker (address='tcp://...'); the embedded one listens on "
                "loopback only and needs none"
            )
        if keys is not None:
            try:
                self._keys = KeyDirectory(keys)
            except (FileNotFoundError, OSError) as exc:
                raise InvalidOption(f"keys: {exc}") from None
        self.address = address
        if address is not None:  # task processes are not this process's children
            self.capabilities = DETACHED_CAPABILITIES
        self.heartbeat = _check_number("heartbeat", heartbeat, 0.01)
        if isinstance(liveness, bool) or not isinstance(liveness, int) or liveness < MIN_LIVENESS:
            raise InvalidOption(f"liveness must be an int >= 2, got {liveness!r}")
        self.liveness = liveness
        self._context: BackendContext | None = None
        self._zmq: zmq.Context[Any] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._local: LocalProcesses | None = None
        self._attempts: dict[int, Attempt] = {}
        self._pids: dict[int, int] = {}  # embedded: the local process running a started attempt
        self._outbox: list[Attempt] = []
        self._waiting: set[int] = set()  # submitted, neither started nor over
        self._aborts: list[int] = []
        self._flush_scheduled = False
        self._incarnation: bytes | None = None
        self._welcomed: asyncio.Event | None = None
        self._heard = 0.0
        self._out_of_touch = False
        self._levels: LevelWatch | None = None
        self._seconds: float | None = None  # smoothed duration of a task
        self._prefetch = 0

    # ================================================================== start and stop

    async def start(self, context: BackendContext) -> None:
        self._context = context
        self._attempts = {}
        self._pids = {}
        self._outbox = []
        self._waiting = set()
        self._aborts = []
        self._incarnation = None
        self._out_of_touch = False
        self._welcomed = asyncio.Event()
        self._levels = LevelWatch()
        address = self.address
        try:
            if address is None:
                self._local = await context.run_blocking(
                    LocalProcesses.start,
                    context.workers,
                    self.heartbeat,
                    self.liveness,
                    timeout=START_TIMEOUT,
                )
                address = self._local.address
            self._connect(address, context)
            try:
                await asyncio.wait_for(self._welcomed.wait(), START_TIMEOUT)
            except TimeoutError:
                raise BackendUnavailable(
                    f"no taskplex zmq broker answered at {address} within {START_TIMEOUT:g} s; "
                    "start one with `taskplex zmq broker --bind ADDRESS`"
                ) from None
        except BaseException:
            await self._close()
            raise
        self._seconds = None
        self._prefetch = 0
        context.spawn(self._supervise(), name="zmq heartbeat")

    def _connect(self, address: str, context: BackendContext) -> None:
        self._zmq = zmq.Context()
        socket = self._socket = self._zmq.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        if self._keys is not None:
            self._keys.configure_peer(socket)
        socket.connect(address)
        self._heard = time.monotonic()
        context.loop.add_reader(socket.fileno(), self._readable)
        self._hello()

    def _hello(self) -> None:
        assert self._levels is not None
        assert self._context is not None
        limit = 0 if self.address is None else self._context.workers
        self._send(
            [
                p.C_HELLO,
                p.PROTOCOL_VERSION,
                p.ORDER_MARK,
                p.pack_u32(limit),
                p.pack_json(self._levels.levels),
            ]
        )

    async def stop(self) -> None:
        if self._socket is not None:
            self._send([p.C_BYE])
        await self._close()

    async def _close(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            if self._context is not None:
                self._context.loop.remove_reader(socket.fileno())
            socket.close()
        zmq_context, self._zmq = self._zmq, None
        if zmq_context is not None:
            zmq_context.term()
        local, self._local = self._local, None
        if local is not None:
            await asyncio.to_thread(local.stop)

    async def _supervise(self) -> None:
        """Ping the broker; notice a silent one, and in embedded mode dead local processes."""
        restarts = 0
        while True:
            await asyncio.sleep(self.heartbeat)
            self._send([p.C_PING])
            silent = time.monotonic() - self._heard
            local = self._local
            if local is None:
                if silent > self.heartbeat * self.liveness and not self._out_of_touch:
                    self._out_of_touch = True
                    logger.warning("the broker at %s is silent; waiting for it", self.address)
                continue
            if local.broker.poll() is not None:
                raise BackendError(f"the local broker exited with status {local.broker.returncode}")
            if silent > max(START_TIMEOUT, self.heartbeat * self.liveness):
                raise BackendError(f"the local broker has been silent for {silent:.0f} s")
            if local.worker.poll() is not None:
                restarts = restarts + 1 if local.young() else 1
                if restarts > RESTARTS:
                    raise BackendError(
                        f"the local worker host exited {RESTARTS} times in a row right after "
                        f"starting (last status {local.worker.returncode})"
                    )
                logger.warning(
                    "the local worker host exited (status %s); starting another", local.worker.returncode
                )
                assert self._context is not None
                await self._context.run_blocking(local.restart_worker, timeout=START_TIMEOUT)

    # ================================================================== tasks

    def prepare(self, task: Task) -> tuple[bytes, bytes]:
        return dumps_call(task.function, task.args, task.kwargs)

    def launch(self, attempts: Sequence[Attempt]) -> None:
        self._outbox.extend(attempts)
        self._schedule_flush()

    def abort(self, attempt: Attempt) -> None:
        if attempt.id in self._attempts:
            self._aborts.append(attempt.id)
            self._schedule_flush()
            pid = self._pids.pop(attempt.id, None)
            if pid is not None:
                _kill_group(pid)
        else:  # still in the outbox, maybe held back there: given back at once
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._socket is None:
            return
        outbox = self._outbox
        if outbox:
            if not all(attempt.wanted for attempt in outbox):
                outbox = self._outbox = self._give_back_unwanted(outbox)
            if outbox and len(self._waiting) < self._refill_below():
                assert self._levels is not None
                levels = self._levels.changed()
                if levels is not None:
                    self._send([p.C_LEVELS, p.pack_json(levels)])
                self._outbox = []
                attempts = self._attempts
                for attempt in outbox:
                    attempts[attempt.id] = attempt
                self._waiting.update(attempt.id for attempt in outbox)
                self._send(_submit_message(outbox))
        if self._aborts:
            aborts, self._aborts = self._aborts, []
            self._send([p.C_ABORT, p.pack_ids(aborts)])

    @staticmethod
    def _give_back_unwanted(outbox: list[Attempt]) -> list[Attempt]:
        wanted = []
        for attempt in outbox:
            if attempt.wanted:
                wanted.append(attempt)
            else:
                attempt.give_back()
        return wanted

    def _refill_below(self) -> int:
        """Tasks launched ahead are submitted once fewer than this many wait unstarted there.

        The broker and worker host then take them in batches rather than one message (and one
        wake-up of each process) per task as slots free up, while enough wait there that no task
        process runs dry: at least one per worker, and half of what is launched ahead."""
        assert self._context is not None
        return max(self._context.workers, self._prefetch // 2)

    def _catch_up(self) -> None:
        """Back in touch after a silence: results sent meanwhile may have been lost with the
        connection, so every task not reported yet is submitted again. The broker ignores those
        it still has; one whose result was lost runs again."""
        if self._socket is None or not self._attempts:
            return
        attempts = list(self._attempts.values())
        logger.warning("back in touch with the broker: checking %d unreported task(s)", len(attempts))
        self._send(_submit_message(attempts))

    def _resubmit(self) -> None:
        """A new broker: everything not yet reported goes to it again (see the module docstring)."""
        self._hello()
        if self._attempts:
            logger.warning("the broker restarted: submitting %d task(s) again", len(self._attempts))
            self._outbox[:0] = self._attempts.values()
            self._attempts = {}
            self._waiting.clear()
            self._schedule_flush()

    def _send(self, frames: list[bytes]) -> None:
        socket = self._socket
        if socket is None:
            return
        p.send(socket, frames)
        if p.readable(socket):  # the send may have eaten the edge of the socket's fd
            asyncio.get_running_loop().call_soon(self._readable)

    # ================================================================== receiving

    def _readable(self) -> None:
        socket = self._socket
        try:
            while socket is not None and (frames := p.receive(socket)) is not None:
                self._heard = time.monotonic()
                if self._out_of_touch:
                    self._out_of_touch = False
                    # after the results the broker kept for us, which arrive first
                    asyncio.get_running_loop().call_later(2 * self.heartbeat, self._catch_up)
                self._handle(frames)
                socket = self._socket
        except Exception as exc:
            assert self._context is not None
            self._context.fail(BackendError(f"receiving from the broker failed: {exc!r}"))

    def _handle(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == p.RESULTS:
            self._started(frames[p.RESULTS_FRAMES :])  # the starts that came with them, if any
            self._results(frames[: p.RESULTS_FRAMES])
            if self._outbox:
                self._schedule_flush()
        elif kind == p.READY:
            self._ready(frames)
        elif kind == p.STARTED:
            self._started(frames[1:])
            if self._outbox:
                self._schedule_flush()
        elif kind == p.LOGS:
            for record in frames[1:]:
                emit_record(unpack_record(record))
        elif kind in (p.PING, p.WELCOME):
            incarnation = frames[1]
            if self._incarnation is None:
                self._incarnation = incarnation
            elif incarnation != self._incarnation:
                self._incarnation = incarnation
                self._resubmit()
            if kind == p.WELCOME and self._welcomed is not None:
                self._welcomed.set()
        elif kind == p.UNKNOWN and self._incarnation is not None:
            # (with no incarnation: an answer to what we sent before our HELLO was read)
            self._incarnation = None
            self._resubmit()

    def _ready(self, frames: list[bytes]) -> None:
        """A worker host would start these attempts: commit to each not withdrawn, and say so.

        The worker host starts nothing without this (``Attempt.claim``): a cancel that withdrew
        an attempt first is never beaten by its start there, and one that comes after can only
        stop its work."""
        attempts = self._attempts
        go: list[int] = []
        refused: list[int] = []
        for attempt_id in p.unpack_ids(frames[1]):
            attempt = attempts.get(attempt_id)
            (go if attempt is not None and attempt.claim() else refused).append(attempt_id)
        self._send([p.C_GO, p.pack_ids(go), p.pack_ids(refused)])

    def _started(self, frames: list[bytes]) -> None:
        """Starts, reported in groups of three frames: attempt ids, worker name, process ids."""
        attempts = self._attempts
        pids = self._pids if self._local is not None else None
        waiting = self._waiting
        for group in range(0, len(frames) - 2, 3):
            worker = frames[group + 1].decode()
            ids, task_pids = p.unpack_ids(frames[group]), p.unpack_ids(frames[group + 2])
            for attempt_id, pid in zip(ids, task_pids, strict=True):
                waiting.discard(attempt_id)
                attempt = attempts.get(attempt_id)
                if attempt is None or pids is None or not pid:
                    if attempt is not None:
                        attempt.started(worker)
                elif attempt.started(worker):
                    pids[attempt_id] = pid
                else:
                    _kill_group(pid)  # withdrawn before this news arrived: the abort is on its way

    def _results(self, frames: list[bytes]) -> None:
        ids = p.unpack_ids(frames[1])
        flags = frames[2]
        payloads = p.unpack_parts(frames[3], frames[4], len(ids))
        attempts = self._attempts
        pids = self._pids
        waiting = self._waiting
        now = time.time()
        seconds = self._seconds
        for index, attempt_id in enumerate(ids):
            attempt = attempts.pop(attempt_id, None)
            if attempt is None:
                continue  # a duplicate: that attempt was reported over already
            pids.pop(attempt_id, None)
            waiting.discard(attempt_id)
            # no start reported: the task ended before its worker host could report it alone
            started_at = attempt.task.started_at
            took = 0.0 if started_at is None else now - started_at
            seconds = took if seconds is None else seconds + _SMOOTHING * (took - seconds)
            flag = flags[index]
            payload = payloads[index]
            if flag == p.UNSTARTED:
                attempt.give_back()
            elif flag == p.LOST:
                attempt.failed(WorkerLost(payload.decode("utf-8", "replace")))
            else:
                try:
                    value = loads(payload)
                except Exception as exc:
                    attempt.failed(
                        ResultUnreadable(
                            f"the result of {attempt.task!r} could not be "
                            f"unpickled here: {type(exc).__name__}: {exc}"
                        )
                    )
                    continue
                if flag == p.OK:
                    attempt.succeeded(value)
                else:
                    attempt.failed(restore_exception(value))
        if seconds is not None:
            self._seconds = seconds
            self._adapt_prefetch(seconds)

    def _adapt_prefetch(self, seconds: float) -> None:
        """Launch about PIPELINE_WINDOW seconds of work per worker ahead (none for long tasks)."""
        assert self._context is not None
        most = EMBEDDED_PREFETCH if self.address is None else DETACHED_PREFETCH
        workers = self._context.workers
        prefetch = (
            0
            if seconds >= PIPELINE_WINDOW
            else min(most, int(workers * PIPELINE_WINDOW / max(seconds, 1e-6)))
        )
        if prefetch != self._prefetch:
            self._prefetch = prefetch
            self._context.set_prefetch(prefetch)


def _submit_message(attempts: list[Attempt]) -> list[bytes]:
    parts: list[bytes] = []
    for attempt in attempts:
        parts.extend(attempt.payload)
    return [p.C_SUBMIT, p.pack_ids([attempt.id for attempt in attempts]), *p.pack_parts(parts)]


def _kill_group(pid: int) -> None:
    """Stop a local task process and what it started at once (its worker host hears of it too).

    A cancel reaches a worker host as a message; in the embedded mode the task process is on this
    machine, so it is also killed here before the cancelled task is delivered, as the mp backend
    does. The worker host reports the process's death as the end of that attempt.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        logger.debug("not allowed to kill task process %d", pid)


class ZmqServer(TaskServer):
    """A TaskServer on :class:`ZmqBackend`: ``taskplex.Executor("zmq", workers=4)``."""

    backend_class = ZmqBackend

    def __init__(
        self,
        *,
        workers: int = 1,
        queue_size: int = 0,
        address: str | None = None,
        keys: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        heartbeat: float = 0.5,
        liveness: int = 6,
    ) -> None:
        backend = ZmqBackend(
            address=address, keys=keys, insecure=insecure, heartbeat=heartbeat, liveness=liveness
        )
        super().__init__(backend, workers=workers, queue_size=queue_size)
