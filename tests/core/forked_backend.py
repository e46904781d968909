"""Small backends that exercise what the shipped ones lack, for the conformance plugin's own tests.

``ForkedServer``: each attempt runs in a forked child process; its result comes back through a
pipe. Aborting an attempt kills the child, so it declares cancel_running, timeout_kills_work and
survives_worker_death.

``HeldServer``: a pool of ``workers`` threads that takes tasks ahead of time (the server may launch
twice as many attempts as it has workers); an attempt starts when a thread picks it up, and one
withdrawn before that never runs.

The conformance plugin tests copy this file into their pytester directory; it is not collected.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from taskplex import Capabilities, ResultUnreadable, SerializationError, Task, TaskServer, WorkerLost
from taskplex.backend import Attempt, Backend, BackendContext, CoroutineBackend, run_in_attempt
from taskplex.errors import ExceptionPayload, capture_exception, restore_exception

_fork = multiprocessing.get_context("fork")


def _run_in_child(payload: bytes, results: Connection) -> None:
    function, args, kwargs = cloudpickle.loads(payload)
    try:
        message: tuple[bool, Any] = (True, function(*args, **kwargs))
    except BaseException as exc:
        message = (False, capture_exception(exc))
    try:
        results.send(message)
    except Exception as exc:
        results.send((False, capture_exception(ResultUnreadable(f"cannot send the result: {exc}"))))


class ForkedBackend(CoroutineBackend):
    capabilities = Capabilities(
        cancel_running=True,
        timeout_kills_work=True,
        survives_worker_death=True,
        worker_processes=True,
    )

    def prepare(self, task: Task) -> bytes:
        try:
            return cloudpickle.dumps((task.function, task.args, task.kwargs))
        except Exception as exc:
            raise SerializationError(f"{task!r} cannot be pickled: {exc}") from exc

    async def execute(self, attempt: Attempt) -> Any:
        reader, writer = _fork.Pipe(duplex=False)
        child = _fork.Process(target=_run_in_child, args=(attempt.payload, writer), daemon=True)
        child.start()
        writer.close()
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(reader.fileno(), wake)
        try:
            await readable
            try:
                ok, value = reader.recv()
            except EOFError:
                child.join()
                raise WorkerLost(f"worker {child.pid} died (exit code {child.exitcode})") from None
        finally:
            loop.remove_reader(reader.fileno())
            if child.is_alive():
                child.kill()
            child.join()
            child.close()
            reader.close()
        if ok:
            return value
        assert isinstance(value, ExceptionPayload)
        raise restore_exception(value)


class ForkedServer(TaskServer):
    backend_class = ForkedBackend

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        super().__init__(ForkedBackend(), workers=workers, queue_size=queue_size)


class HeldBackend(Backend):
    """``workers`` threads, each taking the next attempt from a shared queue when it is free."""

    capabilities = Capabilities(forwards_logs=True)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Attempt | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    async def start(self, context: BackendContext) -> None:
        context.set_prefetch(context.workers)
        self._threads = [
            threading.Thread(target=self._serve, name=f"held-{i}") for i in range(context.workers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads = []

    def launch(self, attempts: Sequence[Attempt]) -> None:
        for attempt in attempts:
            self._queue.put(attempt)

    def abort(self, attempt: Attempt) -> None:
        pass  # an attempt not picked up yet sees it in started(); a running one runs to its end

    def _serve(self) -> None:
        while (attempt := self._queue.get()) is not None:
            self.run(attempt)

    def run(self, attempt: Attempt) -> None:
        if not attempt.started():
            attempt.give_back()
            return
        task = attempt.task
        try:
            result = run_in_attempt(attempt, task.function, *task.args, **task.kwargs)
        except BaseException as exc:
            attempt.failed(exc)
        else:
            attempt.succeeded(result)


class HeldServer(TaskServer):
    backend_class = HeldBackend

    def __init__(self, *, workers: int = 1, queue_size: int = 0) -> None:
        super().__init__(self.backend_class(), workers=workers, queue_size=queue_size)
