"""A worker host: takes tasks from a broker and runs them in supervised processes on this machine.

Data flow, all on one event loop::

    broker ── TASKS keys + payloads ──► Task(run_call, key, function, arguments)
                                          │ launched at once through a Runner
                                          ▼ (the mp backend: supervised task processes)
    broker ◄── STARTED keys, pids ◄── on_started                           ┐ gathered, sent
    broker ◄── LOGS keys, records ◄── a logging handler (by task key)      │ once per turn of
    broker ◄── RESULTS keys, flags, payloads ◄── on_over, on_given_back    ┘ the loop, in order

The broker and the clients have already scheduled, retried and timed every task, so the host
drives the mp backend without a scheduler of its own, through a
:class:`taskplex.backend.Runner`: a task process that dies is noticed and reported (WorkerLost,
which the client retries within the task's ``retries``), CANCEL stops work by killing the process
that runs it, and nothing a task started outlives the host. The mp backend runs ``processes``
tasks at a time and holds the others the broker prefetched to the host.

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
from typing import Any

import zmq

from taskplex import Task
from taskplex.backend import Attempt, Runner
from taskplex.errors import BackendError, ServerNotRunning, TaskCancelled
from taskplex.remote_logging import apply_logger_levels, pack_record
from taskplex.serialization import dumps_exception
from taskplex_mp import MultiprocessingBackend
from taskplex_zmq import _protocol as p
from taskplex_zmq.task_call import KEY_ATTRIBUTE, run_call

__all__ = ["WorkerHost", "default_name"]

logger = logging.getLogger("taskplex.zmq.worker")

REHELLO = 10
"""Silences (``heartbeat * liveness``) without a WELCOME after which a HELLO is sent again."""
_TASK_PROCESS = re.compile(r"pid (\d+)")
"""How the mp backend names the process that runs a task (the ``worker`` of its reports)."""


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
        self.runner = Runner(
            MultiprocessingBackend(),
            workers=processes,
            on_started=self._on_started,
            on_over=self._on_over,
            on_given_back=self._on_given_back,
        )
        self._attempts: dict[int, Attempt] = {}  # key -> the attempt running it (its task's args[0])
        self._asked: dict[int, Task] = {}  # taken; waiting for its client's GO
        self._unanswered: set[int] = set()  # waiting since the last heartbeat: asked again
        self._cancelled: set[int] = set()  # keys the broker cancelled, not yet reported
        self._started: dict[int, int] = {}  # key -> pid of its task process, not yet reported
        self._logs: list[tuple[int, bytes]] = []
        self._results: list[tuple[int, int, bytes]] = []  # key, flag, payload; not yet reported
        self._flush_scheduled = False
        self._incarnation: bytes | None = None
        self._joined = False  # the broker welcomed the last HELLO
        self._hello_sent = 0.0
        self._heard = time.monotonic()
        self._levels: dict[str, int] | None = None
        self._stopping = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ================================================================== running

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then stop every task and report it to the broker."""
        self._loop = loop = asyncio.get_running_loop()
        self._stop = stop
        handler = _KeyedRecords(self._collect_log)
        root = logging.getLogger()
        root.addHandler(handler)
        fd = self.socket.fileno()
        try:
            async with asyncio.TaskGroup() as group:
                await self.runner.start()
                try:
                    loop.add_reader(fd, self._readable)
                    self._hello()
                    beat = group.create_task(self._beat())
                    await stop.wait()
                    beat.cancel()
                finally:
                    self._stopping = True
                    for key in self._asked:  # none of them started: others run them
                        self._report(key, p.UNSTARTED, b"")
                    self._asked.clear()
                    await self.runner.stop()
                    self._flush()
        finally:
            loop.remove_reader(fd)
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
        p.send(socket, frames)
        if p.readable(socket):  # the send may have eaten the edge of the socket's fd
            asyncio.get_running_loop().call_soon(self._readable)

    def _readable(self) -> None:
        """Read every message waiting (the loop watches the socket's fd, which signals edges)."""
        socket = self.socket
        while (frames := p.receive(socket)) is not None:
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
        elif kind == p.GO:
            self._go(p.unpack_ids(frames[1]))
        elif kind == p.CANCEL:
            for key in p.unpack_ids(frames[1]):
                attempt = self._attempts.get(key)
                if attempt is not None:
                    self._cancelled.add(key)
                    self.runner.abort(attempt)
                elif self._asked.pop(key, None) is not None:
                    self._report(key, p.UNSTARTED, b"")  # it never started here
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
        """Tasks from the broker, held until their clients say GO.

        A task starts here only once its client said GO, having committed to it there
        (``Attempt.claim``): a cancel that withdrew it first is never beaten by its start here,
        and one that comes later stops its work. The broker asked the clients when it handed
        the batch out; the host asks again (READY) only about tasks still waiting a heartbeat
        later.
        """
        p.expect(frames, 4, "TASKS")
        keys = p.unpack_ids(frames[1])
        parts = p.unpack_parts(frames[2], frames[3], 2 * len(keys))
        asked = self._asked
        for index, key in enumerate(keys):
            asked[key] = Task(run_call, (key, parts[2 * index], parts[2 * index + 1]))

    def _go(self, keys: list[int]) -> None:
        """Their clients committed to these tasks: start them."""
        asked = self._asked
        tasks = [(key, task) for key in keys if (task := asked.pop(key, None)) is not None]
        if not tasks:
            return
        try:
            attempts = self.runner.launch_many([task for _, task in tasks])
        except (BackendError, ServerNotRunning) as exc:
            self._give_up([key for key, _ in tasks], exc)
            return
        running = self._attempts
        for (key, _), attempt in zip(tasks, attempts, strict=True):
            running[key] = attempt

    def _apply_levels(self, frame: bytes) -> None:
        levels = p.unpack_levels(frame)
        apply_logger_levels(levels, self._levels)
        self._levels = levels

    def _broker_changed(self, reason: str) -> None:
        """The tasks held belong to a broker that no longer counts on them: drop them, rejoin."""
        logger.warning("%s: cancelling %d task(s) and saying hello again", reason, len(self._attempts))
        attempts = list(self._attempts.values())
        self._attempts.clear()  # what is reported of them from now on is dropped
        self._asked.clear()
        self._cancelled.clear()
        self._started.clear()
        self._logs.clear()
        self._results.clear()
        for attempt in attempts:
            self.runner.abort(attempt)
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
            self._ask_again()

    def _ask_again(self) -> None:
        """Ask again about tasks asked a heartbeat ago and still without an answer: the READY or
        the GO may have been lost with a client that was away for a while."""
        asked = self._asked
        again = [key for key in self._unanswered if key in asked]
        self._unanswered = set(asked)
        if again:
            self._send([p.W_READY, p.pack_ids(again)])

    # ================================================================== reporting

    def _on_started(self, attempt: Attempt, worker: str | None) -> None:
        key = attempt.task.args[0]
        if self._attempts.get(key) is attempt:
            found = _TASK_PROCESS.fullmatch(worker or "")
            self._started[key] = int(found.group(1)) if found else 0
            self._schedule_flush()

    def _on_over(
        self, attempt: Attempt, result: Any, error: BaseException | None, worker: str | None
    ) -> None:
        key = attempt.task.args[0]
        if not self._settle(key, attempt):
            return  # of a broker that no longer counts on it
        cancelled = key in self._cancelled
        self._cancelled.discard(key)
        if error is None:
            flag, payload = result  # what run_call returned: the task's own outcome, pickled
        elif cancelled:
            flag = p.ERROR
            payload = dumps_exception(TaskCancelled("its work was stopped on the worker host"))
        elif (failure := self.runner.failure) is not None and error is failure:
            flag, payload = p.LOST, f"worker host {self.name}: {failure}".encode()
            self._give_up([], failure)
        elif self._stopping:
            flag, payload = p.LOST, f"worker host {self.name} stopped while the task ran".encode()
        else:
            flag, payload = p.ERROR, dumps_exception(error)  # WorkerLost: its process died
        self._report(key, flag, payload)

    def _on_given_back(self, attempt: Attempt) -> None:
        key = attempt.task.args[0]
        if self._attempts.get(key) is not attempt:
            return
        if key in self._cancelled or self._stopping:
            self._settle(key, attempt)
            self._cancelled.discard(key)
            self._report(key, p.UNSTARTED, b"")  # the broker hands it elsewhere, unless cancelled
            return
        # it never ran (the process holding it died): it is still this host's to run
        try:
            self._attempts[key] = self.runner.launch(attempt.task)
        except (BackendError, ServerNotRunning) as exc:
            self._settle(key, attempt)
            self._give_up([key], exc)

    def _settle(self, key: int, attempt: Attempt) -> bool:
        """Forget the attempt of ``key``; False if the host no longer holds it."""
        if self._attempts.get(key) is not attempt:
            return False
        del self._attempts[key]
        self._started.pop(key, None)  # not reported yet: the result says it started
        return True

    def _report(self, key: int, flag: int, payload: bytes) -> None:
        self._results.append((key, flag, payload))
        self._schedule_flush()

    def _give_up(self, keys: list[int], error: BaseException) -> None:
        """The mp backend failed: give ``keys`` back to the broker, and stop serving."""
        for key in keys:
            self._report(key, p.UNSTARTED, b"")
        if self._stop is not None and not self._stop.is_set():
            logger.error("worker host %s stops: %s", self.name, error)
            self._stop.set()

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
        """Send what this turn of the loop gathered: log records, then results with the starts.

        A task process reports a result and the start of its next task together, so the starts
        ride in the RESULTS message when there is one: one message, and one wake-up of the broker
        and of the client, per finished task."""
        self._flush_scheduled = False
        started: list[bytes] = []
        if self._started:
            starts, self._started = self._started, {}
            started = [p.pack_ids(list(starts)), p.pack_ids(list(starts.values()))]
        if self._logs:
            logs, self._logs = self._logs, []
            self._send([p.W_LOGS, p.pack_ids([key for key, _ in logs]), *(record for _, record in logs)])
        if self._results:
            results, self._results = self._results, []
            self._send(
                [
                    p.W_RESULTS,
                    p.pack_ids([key for key, _, _ in results]),
                    bytes(flag for _, flag, _ in results),
                    *p.pack_parts([payload for _, _, payload in results]),
                    *started,
                ]
            )
        elif started:
            self._send([p.W_STARTED, *started])


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
