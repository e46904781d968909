"""MultiprocessingServer: tasks run in a pool of worker processes that the server supervises.

Data flow, all on the server's event loop except the first line::

    submit (caller's thread) ── prepare(): the call is pickled, or SerializationError names why not
    TaskServer ── launch([attempt, ...]) ──► backlog ──► _hand_out(): to the least loaded worker
                                                        │ TASK frames, one write per worker
                                                        ▼
                        worker process (one task at a time): STARTED, then RESULT or ERROR
                                                        │ one pipe per worker, read when readable
                                                        ▼
    attempt.succeeded / failed ◄── _process ── STARTED: attempt.started() (the timeout clock)

Each worker's pipes, state and held tasks are a :class:`~taskplex_mp._worker_handle.WorkerHandle`,
which reads and writes the frames without blocking; this module decides what they mean.

**Pipelining.** Each worker may hold a few tasks beyond the one it runs, so that it never waits for
the server between short tasks. How many follows the measured task duration: about 10 ms of work per
worker (up to 64 tasks), and none beyond the running one for tasks of 10 ms or more. Only ``workers``
tasks execute at once; a held task that is cancelled is revoked and never runs, and its timeout
counts from the moment it really starts.

**Stopping work.** Cancelling or timing out a running task kills its worker's process group
(SIGKILL) and starts a replacement; tasks that worker held but had not started are given back to
the server (they run elsewhere, not counted as attempts). A worker that dies by itself fails the
task it was running with WorkerLost, saying how it ended, and that task is retried if its
``retries`` allow.

**Cores.** A task asking for ``resources={"cores": k}`` runs in one worker while ``k - 1`` other
workers stay idle, so it may use ``k`` cores itself; tasks start in submission order, so it waits
until enough workers are free. More cores than ``workers`` are refused at submit.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import multiprocessing
import os
import pickle
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from taskplex import Capabilities, Task, TaskServer
from taskplex.backend import Attempt, Backend, BackendContext
from taskplex.errors import (
    BackendUnavailable,
    InvalidOption,
    ResultUnreadable,
    WorkerLost,
    restore_exception,
)
from taskplex.remote_logging import LevelWatch, emit_record, unpack_record
from taskplex.scheduler import check_int
from taskplex.serialization import dumps_call, loads
from taskplex_mp import processes
from taskplex_mp._frames import (
    CONFIG,
    ERROR,
    HELLO,
    LEVELS,
    LOG,
    RESULT,
    REVOKE,
    SECONDS,
    SKIPPED,
    STARTED,
    Payload,
    frame,
    task_frame,
)
from taskplex_mp._worker_handle import (
    DEAD,
    KILLED,
    READY,
    RETIRING,
    STARTING,
    WorkerHandle,
)

__all__ = ["DEFAULT_START_METHOD", "MultiprocessingBackend", "MultiprocessingServer", "default_workers"]

logger = logging.getLogger("taskplex.mp")

DEFAULT_START_METHOD = (
    "forkserver" if "forkserver" in processes.START_METHODS else processes.START_METHODS[0]
)
START_TIMEOUT = 60.0
"""Seconds a new worker (or the fork server) may take to start before start() fails."""
STOP_GRACE = 1.0
"""Seconds between the steps of stopping workers: close their pipe, SIGTERM, SIGKILL."""
START_ATTEMPTS = 3
"""Failed starts in a row after which, with no worker left, queued tasks fail instead of waiting."""
PIPELINE_WINDOW = 0.01
"""Seconds of work a worker may hold beyond the task it runs."""
MAX_DEPTH = 64
"""Most tasks a worker may hold, the running one included."""
_SMOOTHING = 0.2


def _check_platform() -> None:
    if os.name != "posix":
        raise BackendUnavailable(
            "the mp backend needs a POSIX system (Linux, macOS); on Windows use the async backend "
            "or concurrent.futures.ProcessPoolExecutor"
        )


def default_workers() -> int:
    """One worker per CPU this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class MultiprocessingBackend(Backend):
    """Run tasks in supervised worker processes on this machine; see the module docstring.

    Options: ``max_tasks_per_child`` (replace a worker after that many tasks; None: never) and
    ``start_method`` (``"forkserver"``, ``"spawn"`` or ``"fork"``; see :mod:`taskplex_mp.processes`).
    """

    capabilities = Capabilities(
        cancel_running=True,
        timeout_kills_work=True,
        survives_worker_death=True,
        remote=False,
        worker_processes=True,
        forwards_logs=True,
        resources=frozenset({"cores"}),
    )

    def __init__(
        self, *, max_tasks_per_child: int | None = None, start_method: str = DEFAULT_START_METHOD
    ) -> None:
        _check_platform()
        if max_tasks_per_child is not None:
            check_int("max_tasks_per_child", max_tasks_per_child, 1)
        if start_method not in processes.START_METHODS:
            raise InvalidOption(
                f"start_method must be one of {', '.join(map(repr, processes.START_METHODS))} "
                f"on this platform, got {start_method!r}"
            )
        self.max_tasks_per_child = max_tasks_per_child
        self.start_method = start_method
        self._context: BackendContext | None = None
        self.workers = 1
        self._depth = 1
        self._seconds: float | None = None
        self._reset(stopping=True)

    def _reset(self, *, stopping: bool) -> None:
        self._workers: list[WorkerHandle] = []
        self._backlog: deque[Attempt] = deque()
        self._assigned: dict[int, WorkerHandle] = {}
        self._by_pid: dict[int, WorkerHandle] = {}
        self._by_request: dict[int, WorkerHandle] = {}
        self._busy = 0
        self._hand_out_scheduled = False
        self._stopping = stopping
        self._start_failures = 0
        self._broken: str | None = None
        self._forkserver: processes.ForkServer | None = None
        self._reaper: processes.Reaper | None = None
        self._config: dict[str, Any] = {}
        self._levels: LevelWatch | None = None
        self._levels_frame: bytes | None = None  # once the caller's levels changed since start
        self._all_ready: asyncio.Future[None] | None = None

    # ================================================================== start and stop

    async def start(self, context: BackendContext) -> None:
        processes.check_capacity(context.workers)
        self._context = context
        self.workers = context.workers
        self._depth = 1
        self._reset(stopping=False)
        loop = self._running_loop()
        self._levels = levels = LevelWatch()
        self._levels_frame = None
        self._config = {
            "sys_path": list(sys.path),
            "log_levels": levels.levels,
            # arguments such as multiprocessing.Manager proxies authenticate with the caller's key
            "authkey": bytes(multiprocessing.current_process().authkey),
        }
        self._all_ready = loop.create_future()
        try:
            # started first, so that no worker (and nothing its task starts) can outlive the caller
            self._reaper = processes.Reaper()
            if self.start_method == "forkserver":
                self._forkserver = self._new_forkserver()
                await self._forkserver.ready(START_TIMEOUT)
            for _ in range(self.workers):
                self._start_worker()
            await asyncio.wait_for(asyncio.shield(self._all_ready), START_TIMEOUT)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise BackendUnavailable(
                    f"{self.workers} worker process(es) did not all start within "
                    f"{START_TIMEOUT} s (start_method={self.start_method!r})"
                ) from None
            raise

    async def stop(self) -> None:
        self._stopping = True
        self._backlog.clear()
        for worker in self._workers:
            worker.close_task_pipe(drop_outbox=True)  # a worker between tasks exits when its pipe ends
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            alive = [worker for worker in self._workers if worker.state is not DEAD]
            if not alive:
                break
            for worker in alive:
                if sig is not None and worker.pid is not None:
                    processes.kill_group(worker.pid, sig)
            await asyncio.wait([worker.exited for worker in alive], timeout=STOP_GRACE)
        for worker in self._workers:  # _on_exit removed every worker that did exit
            logger.error("%r did not exit after SIGKILL; giving up on it", worker)
            worker.close_pipes()
        forkserver = self._forkserver
        if forkserver is not None:
            forkserver.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(forkserver.exited), STOP_GRACE)
            if not forkserver.exited.done():
                forkserver.kill()
                await asyncio.wait([forkserver.exited], timeout=STOP_GRACE)
        if self._reaper is not None:
            await asyncio.to_thread(self._reaper.close, STOP_GRACE)
        self._reset(stopping=True)

    def _new_forkserver(self) -> processes.ForkServer:
        forkserver = processes.ForkServer(
            self._running_loop(), self._on_forked, self._on_forkserver_exit, self._on_forkserver_lost
        )
        forkserver.launch(self._config)
        return forkserver

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._context is not None
        return self._context.loop

    def _start_worker(self) -> None:
        """Start one worker process; it is given tasks once it says HELLO."""
        loop = self._running_loop()
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        os.set_blocking(task_w, False)
        os.set_blocking(result_r, False)
        worker = WorkerHandle(loop, task_w, result_r, self.max_tasks_per_child)
        worker.send(frame(CONFIG, 0, pickle.dumps(self._config, pickle.HIGHEST_PROTOCOL)))
        try:
            if self.start_method == "spawn":
                worker.popen = processes.spawn_worker(task_r, result_w)
                self._watch(worker, worker.popen.pid)
            elif self.start_method == "fork":
                others = [fd for w in self._workers for fd in (w.task_fd, w.result_fd) if fd >= 0]
                if self._reaper is not None:
                    others.append(self._reaper.fd)
                pid = processes.fork_worker(task_r, result_w, [task_w, result_r, *others])
                self._watch(worker, pid)
            else:
                if self._forkserver is None or not self._forkserver.alive:
                    self._forkserver = self._new_forkserver()
                worker.forkserver = self._forkserver
                self._by_request[self._forkserver.fork(task_r, result_w)] = worker
        except BaseException:
            worker.close_pipes()
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        loop.add_reader(result_r, self._on_readable, worker)
        self._workers.append(worker)

    def _watch(self, worker: WorkerHandle, pid: int) -> None:
        worker.pid = pid
        self._guard(pid)
        processes.watch_exit(self._running_loop(), pid, lambda code: self._on_exit(worker, code))

    def _guard(self, pid: int) -> None:
        """Have the reaper kill the worker's process group if this process goes away."""
        if self._reaper is not None:
            self._reaper.watch(pid)

    def _on_forked(self, request_id: int, pid: int) -> None:
        worker = self._by_request.pop(request_id, None)
        if worker is not None:
            worker.pid = pid
            self._guard(pid)
            self._by_pid[pid] = worker

    def _on_forkserver_exit(self, pid: int, code: int) -> None:
        worker = self._by_pid.pop(pid, None)
        if worker is not None:
            self._on_exit(worker, code)

    def _on_forkserver_lost(self, forkserver: processes.ForkServer) -> None:
        """The fork server ended: its workers died with it (or are killed now)."""
        if self._forkserver is forkserver:
            self._forkserver = None
        lost = []
        for table in (self._by_request, self._by_pid):
            for key in [key for key, worker in table.items() if worker.forkserver is forkserver]:
                lost.append(table.pop(key))
        for worker in lost:
            if worker.pid is not None:
                processes.kill_group(worker.pid)
            self._on_exit(worker, None)

    # ================================================================== the backend API

    def prepare(self, task: Task) -> tuple[bytes, bytes]:
        return dumps_call(task.function, task.args, task.kwargs)

    def launch(self, attempts: Sequence[Attempt]) -> None:
        if self._broken is not None:
            for attempt in attempts:
                attempt.failed(WorkerLost(self._broken))
            return
        self._backlog.extend(attempts)
        self._schedule_hand_out()

    def abort(self, attempt: Attempt) -> None:
        token = attempt.id
        worker = self._assigned.get(token)
        if worker is None:
            if attempt in self._backlog:
                self._backlog.remove(attempt)
                attempt.give_back()
        elif worker.current == token:
            self._kill(worker, token)
        elif token not in worker.revoking:
            worker.revoking.add(token)
            worker.send(frame(REVOKE, token))

    # ================================================================== handing out tasks

    def _hand_out(self) -> None:
        """Give backlog tasks to workers with room, least loaded first; one write per worker."""
        self._hand_out_scheduled = False
        backlog = self._backlog
        if not backlog or self._stopping:
            return
        if self._levels is not None and (levels := self._levels.changed()) is not None:
            self._send_levels(levels)
        depth = self._depth
        room = [
            (len(worker.queue), index, worker)
            for index, worker in enumerate(self._workers)
            if worker.state is READY and worker.cores <= 1 and len(worker.queue) < depth
        ]
        heapq.heapify(room)
        frames: dict[WorkerHandle, list[bytes]] = {}
        while backlog and room:
            attempt = backlog[0]
            if not attempt.wanted:  # cancelled while waiting here: its slots go back now
                backlog.popleft()
                attempt.give_back()
                continue
            task = attempt.task
            token = attempt.id
            load, index, worker = room[0]
            cores = task.resources.cores
            if load == 0 and self._busy + cores > self.workers:
                if cores > 1:
                    break  # in order: wait until enough workers are idle
                heapq.heappop(room)  # may not start another worker; busy ones may take it
                continue
            if cores > 1 and load > 0:
                break
            heapq.heappop(room)
            backlog.popleft()
            if load == 0:
                self._busy += cores
                worker.cores = cores
            worker.queue[token] = attempt
            self._assigned[token] = worker
            function, arguments = attempt.payload
            frames.setdefault(worker, []).extend(task_frame(token, function, arguments))
            if worker.budget is not None:
                worker.budget -= 1
                if worker.budget == 0:
                    self._retire(worker)
            if worker.state is READY and cores == 1 and load + 1 < depth:
                heapq.heappush(room, (load + 1, index, worker))
        for worker, batch in frames.items():
            worker.send(*batch)

    def _send_levels(self, levels: dict[str, int]) -> None:
        """The caller changed a logger level: running workers apply it before their next task."""
        self._levels_frame = message = frame(LEVELS, 0, pickle.dumps(levels, pickle.HIGHEST_PROTOCOL))
        for worker in self._workers:
            if worker.state is not DEAD:
                worker.send(message)

    def _schedule_hand_out(self) -> None:
        if self._backlog and not self._hand_out_scheduled:
            self._hand_out_scheduled = True
            self._running_loop().call_soon(self._hand_out)

    def _retune(self) -> None:
        """Set how many tasks a worker may hold from the measured task duration."""
        seconds = self._seconds
        if seconds is None or seconds >= PIPELINE_WINDOW:
            depth = 1
        else:
            wanted = min(MAX_DEPTH, 1 + int(PIPELINE_WINDOW / max(seconds, 1e-7)))
            depth = 1 << (wanted.bit_length() - 1)  # powers of two: noise does not flap it
        if depth != self._depth:
            self._depth = depth
            assert self._context is not None
            self._context.set_prefetch(self.workers * (depth - 1))
            self._schedule_hand_out()

    # ================================================================== reading from workers

    def _on_readable(self, worker: WorkerHandle) -> None:
        # tasks launched while this batch is handled (as slots free up) go out in one go at the end
        already_scheduled = self._hand_out_scheduled
        self._hand_out_scheduled = True
        try:
            worker.read()
            self._process(worker)
            self._retune()
        finally:
            if not already_scheduled:
                self._hand_out()

    def _process(self, worker: WorkerHandle) -> None:
        """Handle the worker's frames in order; safe to re-enter (through complete's callbacks)."""
        inbox = worker.inbox
        while inbox:
            kind, token, payload = inbox.popleft()
            if kind in (RESULT, ERROR):
                self._on_outcome(worker, kind, token, payload)
            elif kind == STARTED:
                self._on_started(worker, token)
            elif kind == LOG:
                self._on_log(worker, payload)
            elif kind == SKIPPED:
                attempt = self._release(worker, token)
                if worker.budget is not None:
                    worker.budget += 1
                attempt.give_back()
            elif kind == HELLO:
                self._on_hello(worker, token)

    def _on_outcome(self, worker: WorkerHandle, kind: int, token: int, payload: Payload) -> None:
        (seconds,) = SECONDS.unpack_from(payload)
        previous = self._seconds
        self._seconds = seconds if previous is None else previous + _SMOOTHING * (seconds - previous)
        attempt = self._release(worker, token)
        body = memoryview(payload)[SECONDS.size :]
        try:
            if kind == RESULT:
                result = loads(body)
                error = None
            else:
                result, error = None, restore_exception(loads(body))
        except BaseException as exc:  # SystemExit from a __reduce__ fails this task, not the server
            if isinstance(exc, KeyboardInterrupt):
                raise
            result, error = (
                None,
                ResultUnreadable(f"the outcome of {attempt.task!r} cannot be unpickled here: {exc!r}"),
            )
        if error is None:
            attempt.succeeded(result, worker.name)
        else:
            attempt.failed(error, worker.name)

    def _on_log(self, worker: WorkerHandle, payload: Payload) -> None:
        try:
            record = unpack_record(bytes(payload))  # the same bytes, unless a large record's bytearray
        except Exception as exc:  # it holds an object of a class this process cannot import
            logger.warning("a log record from worker %s cannot be unpickled here: %r", worker.name, exc)
            return
        emit_record(record)

    def _on_started(self, worker: WorkerHandle, token: int) -> None:
        worker.current = token
        attempt = worker.queue[token]
        if token in worker.revoking or not attempt.started(worker.name):
            self._kill(worker, token)  # it started before the revocation arrived

    def _on_hello(self, worker: WorkerHandle, pid: int) -> None:
        worker.pid = pid
        worker.name = f"pid {pid}"
        if worker.state is STARTING:
            worker.state = READY
            if self._levels_frame is not None:  # it was configured with the levels at start
                worker.send(self._levels_frame)
        self._start_failures = 0
        self._broken = None
        all_ready = self._all_ready
        starting = any(worker.state is STARTING for worker in self._workers)
        if all_ready is not None and not all_ready.done() and not starting:
            all_ready.set_result(None)
        self._schedule_hand_out()

    def _release(self, worker: WorkerHandle, token: int) -> Attempt:
        """Take a reported token off its worker; an idle worker gives back its cores."""
        attempt = worker.queue.pop(token)
        del self._assigned[token]
        worker.revoking.discard(token)
        if worker.current == token:
            worker.current = None
        if not worker.queue:
            self._busy -= worker.cores
            worker.cores = 0
            if worker.state is RETIRING:
                worker.close_task_pipe(drop_outbox=self._stopping)
        self._schedule_hand_out()
        return attempt

    # ================================================================== replacing workers

    def _retire(self, worker: WorkerHandle) -> None:
        """The worker had its max_tasks_per_child: give it no more, start its successor."""
        worker.state = RETIRING
        if not worker.queue:
            worker.close_task_pipe(drop_outbox=self._stopping)
        self._replace()

    def _kill(self, worker: WorkerHandle, victim: int) -> None:
        """Stop the attempt ``victim`` by killing the worker running it; start a successor."""
        if worker.state in (KILLED, DEAD):
            return
        # what the worker already reported may show the attempt over, or that it never began
        worker.read()
        self._process(worker)
        if worker.current != victim:
            if victim in worker.queue and victim not in worker.revoking:
                worker.revoking.add(victim)
                worker.send(frame(REVOKE, victim))
            return
        previous = worker.state
        worker.state = KILLED
        worker.victim = victim
        if worker.pid is not None:
            processes.kill_group(worker.pid)
        if previous is not RETIRING:
            self._replace()

    def _replace(self) -> None:
        if not self._stopping:
            try:
                self._start_worker()
            except OSError as exc:
                self._start_failed(f"a worker process could not be started: {exc}")

    def _on_exit(self, worker: WorkerHandle, code: int | None) -> None:
        """The worker process ended: settle every task it held, and replace it if it should be."""
        if worker.state is DEAD:
            return
        while worker.read():  # all it wrote before it ended
            pass
        self._process(worker)
        previous = worker.state
        worker.state = DEAD
        worker.close_pipes()
        if worker.popen is not None:
            worker.popen.returncode = code  # reaped by the watcher
        if worker.pid is not None:
            processes.kill_group(worker.pid)  # whatever its task started and left behind
            if self._reaper is not None:
                self._reaper.forget(worker.pid)
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        self._busy -= worker.cores
        worker.cores = 0
        how = processes.describe_exit(code)
        settled, innocent = worker.sort_held_tasks(previous, how)
        for token in worker.queue:
            del self._assigned[token]
        worker.queue.clear()
        if previous is STARTING:
            self._start_failed(
                f"a worker process{f' (pid {worker.pid})' if worker.pid else ''} {how} before it "
                "was ready; its error output, if any, is above (stderr). Check that "
                f"`{sys.executable} -c 'import taskplex_mp.worker'` works here"
            )
        elif previous is READY and not self._stopping:
            logger.warning("worker %s %s; starting another", worker.name, how)
            self._replace()
        worker.exited.set_result(None)
        for attempt in innocent:
            attempt.give_back()
        for attempt, error in settled:
            attempt.failed(error, worker.name)
        self._schedule_hand_out()

    def _start_failed(self, message: str) -> None:
        all_ready = self._all_ready
        if all_ready is not None and not all_ready.done():
            all_ready.set_exception(BackendUnavailable(message))
            return
        if self._stopping:
            return
        self._start_failures += 1
        logger.error("%s (failure %d in a row)", message, self._start_failures)
        if self._start_failures >= START_ATTEMPTS and not any(w.state is READY for w in self._workers):
            self._broken = f"no worker process can be started: {message}"
            backlog, self._backlog = self._backlog, deque()
            for attempt in backlog:
                attempt.failed(WorkerLost(self._broken))
        delay = min(5.0, 0.1 * 2**self._start_failures)
        self._running_loop().call_later(delay, self._replace)


class MultiprocessingServer(TaskServer):
    """A server whose tasks run in supervised worker processes on this machine.

    Options: ``workers`` (processes; default one per CPU this process may use), ``queue_size``,
    ``max_tasks_per_child`` (replace a worker after that many tasks; None: never) and
    ``start_method`` (``"forkserver"``, ``"spawn"`` or ``"fork"``; see :mod:`taskplex_mp.processes`).
    """

    backend_class = MultiprocessingBackend

    def __init__(
        self,
        *,
        workers: int | None = None,
        queue_size: int = 0,
        max_tasks_per_child: int | None = None,
        start_method: str = DEFAULT_START_METHOD,
    ) -> None:
        backend = MultiprocessingBackend(
            max_tasks_per_child=max_tasks_per_child, start_method=start_method
        )
        super().__init__(
            backend, workers=default_workers() if workers is None else workers, queue_size=queue_size
        )
        processes.check_capacity(self.workers)  # a clear error now, not EMFILE half-way through
