"""A worker host: takes tasks from a broker and runs them in supervised processes on this machine.

Data flow, all on one event loop::

    broker ── TASKS keys + payloads ──► Task(run_call, key, function, arguments)
                                          │ accept + enqueue on a MultiprocessingServer
                                          ▼ (the mp backend: supervised task processes)
    broker ◄── STARTED keys, pids ◄── taskplex_task_started hook          ┐ gathered, sent
    broker ◄── LOGS keys, records ◄── a logging handler (by task key)     │ once per turn of
    broker ◄── RESULTS keys, flags, payloads ◄── the tasks' _Finished queue ┘ the loop, in order

The host runs the mp backend through its public API, so a task process that dies is noticed and
reported (WorkerLost, which the client retries within the task's ``retries``), CANCEL stops work
by killing the process that runs it, and nothing a task started outlives the host.

The host pings the broker every ``heartbeat`` seconds. If the broker is silent for ``heartbeat *
liveness`` seconds, or turns out to be a new broker (another incarnation), the tasks of the old
one are cancelled — it has already handed them elsewhere — and the host says hello again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket as socket_module
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

import taskplex
from taskplex import ResultsQueue, Task, TaskStatus, plugins
from taskplex.errors import TaskCancelled, WorkerLost
from taskplex.remote_logging import apply_logger_levels, pack_record
from taskplex.serialization import dumps_exception
from taskplex_mp import MultiprocessingServer
from taskplex_zmq import _protocol as p
from taskplex_zmq.task_call import KEY_ATTRIBUTE, run_call

__all__ = ["WorkerHost", "default_name"]

logger = logging.getLogger("taskplex.zmq.worker")

REHELLO = 10
"""Silences (``heartbeat * liveness``) without a WELCOME after which a HELLO is sent again."""
_TASK_PROCESS = re.compile(r"pid (\d+)")
"""How the mp backend names the process that runs a task (``Task.worker``)."""


def _readable(socket: zmq.Socket[bytes]) -> bool:
    return bool(cast(int, socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def default_name() -> str:
    """``host:pid``: how clients see where their task ran."""
    return f"{socket_module.gethostname()}:{os.getpid()}"


class _KeyedRecords(logging.Handler):
    """Collects the records of tasks (those carrying a task key) for the host to send."""

    def __init__(self, collect: Callable[[int, bytes], None]) -> None:
        super().__init__()
        self._collect = collect

    def emit(self, record: logging.LogRecord) -> None:
        key = getattr(record, KEY_ATTRIBUTE, None)
        if isinstance(key, int):
            self._collect(key, pack_record(record))


class _Finished(ResultsQueue):
    """The results queue of the host's tasks: hands each finished task to the host at once.

    The server delivers on its loop, where the host gathers what a turn of the loop finished and
    sends it in one message; no reader task, lock or wake-up per batch is needed.
    """

    def __init__(self, deliver: Callable[[Task], None]) -> None:
        super().__init__()
        self._deliver = deliver

    def put(self, task: Task) -> None:
        self._deliver(task)


class WorkerHost:
    """Serve one broker with ``processes`` task processes; see the module docstring.

    ``prefetch`` is how many tasks the host takes beyond those it runs, so that its processes
    never wait for the broker between short tasks.
    """

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        *,
        processes: int,
        prefetch: int | None = None,
        name: str | None = None,
        heartbeat: float = 0.5,
        liveness: int = 6,
    ) -> None:
        self.socket = socket
        self.processes = processes
        self.capacity = processes + (2 * processes if prefetch is None else prefetch)
        self.name = name or default_name()
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.server = MultiprocessingServer(workers=processes)
        self._results = _Finished(self._finished)
        self._tasks: dict[int, Task] = {}  # key -> the task running it (its args begin with the key)
        self._started: dict[int, int] = {}  # key -> pid of its task process, not yet reported
        self._logs: list[tuple[int, bytes]] = []
        self._done: list[Task] = []  # finished, not yet reported
        self._flush_scheduled = False
        self._incarnation: bytes | None = None
        self._joined = False  # the broker welcomed the last HELLO
        self._hello_sent = 0.0
        self._heard = time.monotonic()
        self._levels: dict[str, int] | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ================================================================== running

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then stop every task and report it to the broker."""
        self._loop = asyncio.get_running_loop()
        handler = _KeyedRecords(self._collect_log)
        root = logging.getLogger()
        root.addHandler(handler)
        plugin_name = f"taskplex-zmq-worker-{id(self)}"
        plugins.register_plugin(self, plugin_name)
        fd = self.socket.fileno()
        try:
            async with asyncio.TaskGroup() as group:
                await self.server.start(group)
                self._loop.add_reader(fd, self._readable)
                self._hello()
                beat = group.create_task(self._beat())
                await stop.wait()
                self._stopping = True
                await self.server.stop()
                self._flush()
                beat.cancel()
        finally:
            self._loop.remove_reader(fd)
            plugins.pm.unregister(name=plugin_name)
            root.removeHandler(handler)

    def _hello(self) -> None:
        self._joined = False
        self._incarnation = None
        self._hello_sent = time.monotonic()
        self._send(
            [p.W_HELLO, p.PROTOCOL_VERSION, p.ORDER_MARK, p.pack_u32(self.capacity), self.name.encode()]
        )

    def _send(self, frames: list[bytes]) -> None:
        socket = self.socket
        socket.send_multipart(frames)
        if _readable(socket):  # the send may have eaten the edge of the socket's fd
            asyncio.get_running_loop().call_soon(self._readable)

    def _readable(self) -> None:
        """Read every message waiting (the loop watches the socket's fd, which signals edges)."""
        socket = self.socket
        while _readable(socket):
            frames = socket.recv_multipart(zmq.NOBLOCK)
            self._heard = time.monotonic()
            try:
                self._handle(frames)
            except (p.Malformed, ValueError, IndexError) as exc:
                logger.warning("dropped a message from the broker: %s", exc)

    def _handle(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == p.TASKS:
            if self._joined:  # else: sent before the broker read our HELLO; it hands them elsewhere
                self._take(frames)
        elif kind == p.CANCEL:
            for key in p.unpack_ids(frames[1]):
                task = self._tasks.get(key)
                if task is not None:
                    task.cancel()
        elif kind == p.PING:
            if self._incarnation is not None and frames[1] != self._incarnation:
                self._broker_changed("the broker restarted")
        elif kind == p.WELCOME:
            if self._incarnation is not None and frames[1] != self._incarnation:
                self._broker_changed("the broker restarted")
            self._incarnation = frames[1]
            self._joined = True
            self._apply_levels(frames[2])
        elif kind == p.LEVELS:
            self._apply_levels(frames[1])
        elif kind == p.UNKNOWN:
            if self._joined:  # else: an answer to what we sent before our HELLO
                self._broker_changed("the broker does not know this host")
        else:
            raise p.Malformed(f"kind {kind[:8]!r}")

    def _take(self, frames: list[bytes]) -> None:
        p.expect(frames, 4, "TASKS")
        keys = p.unpack_ids(frames[1])
        parts = p.unpack_parts(frames[2], frames[3], 2 * len(keys))
        server, results = self.server, self._results
        batch = []
        tasks = self._tasks
        for index, key in enumerate(keys):
            task = Task(run_call, (key, parts[2 * index], parts[2 * index + 1]), results_queue=results)
            server.accept(task)
            tasks[key] = task
            batch.append(task)
        server.enqueue_accepted(batch)

    def _apply_levels(self, frame: bytes) -> None:
        levels = p.unpack_levels(frame)
        apply_logger_levels(levels, self._levels)
        self._levels = levels

    def _broker_changed(self, reason: str) -> None:
        """The tasks held belong to a broker that no longer counts on them: drop them, rejoin."""
        logger.warning("%s: cancelling %d task(s) and saying hello again", reason, len(self._tasks))
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        self._started.clear()
        self._logs.clear()
        self._done.clear()
        self._hello()

    async def _beat(self) -> None:
        ping = [p.W_PING]
        silence = self.heartbeat * self.liveness
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            if not self._joined:
                # a HELLO waits in the socket until a broker reads it; say it again only if a
                # broker may have read it and died before it answered
                if now - self._hello_sent > REHELLO * silence:
                    self._hello()
                continue
            if now - self._heard > silence:
                self._broker_changed("the broker is silent")
                continue
            self._send(ping)

    # ================================================================== reporting

    @taskplex.hookimpl
    def taskplex_task_started(self, task: Task, server: Any) -> None:
        if server is not self.server:
            return
        key = task.args[0]
        if self._tasks.get(key) is task:
            found = _TASK_PROCESS.fullmatch(task.worker or "")
            self._started[key] = int(found.group(1)) if found else 0
            self._schedule_flush()

    def _finished(self, task: Task) -> None:
        self._done.append(task)
        self._wake()

    def _collect_log(self, key: int, record: bytes) -> None:
        self._logs.append((key, record))
        self._wake()

    def _wake(self) -> None:
        """Have what was gathered sent this turn of the loop; safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._schedule_flush()
        else:
            loop.call_soon_threadsafe(self._schedule_flush)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this turn of the loop gathered: starts, then log records, then results."""
        self._flush_scheduled = False
        keys: list[int] = []
        flags = bytearray()
        payloads: list[bytes] = []
        if self._done:
            done, self._done = self._done, []
            tasks, started = self._tasks, self._started
            for task in done:
                key = task.args[0]
                if tasks.get(key) is not task:
                    continue  # of a broker that no longer counts on it
                del tasks[key]
                started.pop(key, None)  # not reported yet: the result says it started
                flag, payload = self._outcome(task)
                keys.append(key)
                flags.append(flag)
                payloads.append(payload)
        if self._started:
            started, self._started = self._started, {}
            self._send([p.W_STARTED, p.pack_ids(list(started)), p.pack_ids(list(started.values()))])
        if self._logs:
            logs, self._logs = self._logs, []
            self._send([p.W_LOGS, p.pack_ids([key for key, _ in logs]), *(record for _, record in logs)])
        if keys:
            self._send([p.W_RESULTS, p.pack_ids(keys), bytes(flags), *p.pack_parts(payloads)])

    def _outcome(self, task: Task) -> tuple[int, bytes]:
        if task.status is TaskStatus.SUCCEEDED:
            flag, payload = task.result
            return flag, payload
        if task.status is TaskStatus.CANCELLED:
            if task.started_at is None:
                return p.UNSTARTED, b""
            if self._stopping:
                return p.LOST, f"worker host {self.name} stopped while the task ran".encode()
            return p.ERROR, dumps_exception(TaskCancelled("its work was stopped on the worker host"))
        error = task.exception
        if error is None:
            error = WorkerLost(f"task {task.id} ended without a result on {self.name}")
        return p.ERROR, dumps_exception(error)


def serve(
    address: str,
    *,
    processes: int,
    watch_fd: int | None = None,
    configure: Callable[[zmq.Socket[Any]], None] | None = None,
    **options: Any,
) -> None:
    """Run a worker host connected to the broker at ``address`` until SIGTERM, SIGINT or EOF."""
    asyncio.run(_serve(address, processes, watch_fd, configure, options))


async def _serve(
    address: str,
    processes: int,
    watch_fd: int | None,
    configure: Callable[[zmq.Socket[Any]], None] | None,
    options: dict[str, Any],
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if watch_fd is not None:

        def parent_gone() -> None:
            if not os.read(watch_fd, 4096):
                loop.remove_reader(watch_fd)
                stop.set()

        loop.add_reader(watch_fd, parent_gone)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.setsockopt(zmq.SNDHWM, 0)  # results wait here while the broker is away
    socket.setsockopt(zmq.RCVHWM, 0)
    if configure is not None:
        configure(socket)
    socket.connect(address)
    try:
        await WorkerHost(socket, processes=processes, **options).run(stop)
    finally:
        socket.close()
        with contextlib.suppress(Exception):
            context.term()
