"""A minimal process backend, used to check the suite's tests of capabilities no shipped backend has.

Each attempt runs in a forked child process; its result comes back through a pipe. Aborting an
attempt kills the child, so it declares cancel_running, timeout_kills_work and survives_worker_death.
The conformance plugin tests copy this file into their pytester directory; it is not collected.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from taskplex import Capabilities, ResultUnreadable, SerializationError, ServerBase, Task, WorkerLost
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


class ForkedServer(ServerBase):
    capabilities = Capabilities(
        cancel_running=True,
        timeout_kills_work=True,
        survives_worker_death=True,
        worker_processes=True,
    )

    def prepare(self, task: Task) -> None:
        super().prepare(task)
        try:
            task.payload = cloudpickle.dumps((task.function, task.args, task.kwargs))
        except Exception as exc:
            raise SerializationError(f"{task!r} cannot be pickled: {exc}") from exc

    async def execute(self, task: Task) -> Any:
        reader, writer = _fork.Pipe(duplex=False)
        child = _fork.Process(target=_run_in_child, args=(task.payload, writer), daemon=True)
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
