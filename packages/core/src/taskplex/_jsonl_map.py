"""``taskplex map``: call one function on every line of a JSONL file, on any backend.

Data flow (the calling thread coordinates; the backend runs in the Executor's thread)::

    --inputs ─► one line ─► json ─► Executor.submit ─► backend
       ▲                                                  │ done callback, completion order
       │ read on only while fewer than `window` tasks     ▼
       │ are submitted but not yet written       completions (wakes the calling thread)
       │                                                  │
    --output ◄── record i, once records 0..i are all ready ◄┘

Memory stays bounded however long the input: at most ``window`` lines are parsed and not yet written.
Output is written in input order as it becomes ready and flushed whenever the loop waits.

Records: ``{"index": i, "ok": true, "result": ...}``; a result JSON cannot represent is written as
its ``repr`` with ``"repr": true``. A failure is ``{"index": i, "ok": false, "error": {"type",
"message", "traceback"}}``; the traceback is null when the function never ran (the line was not valid
JSON, or the backend refused the task). ``index`` counts non-blank input lines from 0. Cancelled tasks
are counted in the summary, not written.

Ctrl-C once: stop reading input, cancel queued tasks, let running ones end, write what finished, exit
130. Twice: stop the server, cancelling running tasks where the backend can. A third Ctrl-C gets the
default action (the process ends at once).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO, Any

from taskplex import plugins
from taskplex._callable_ref import import_callable
from taskplex.cli import EXIT_INTERRUPTED, CommandLineError, discard_stdout
from taskplex.errors import TaskCancelled, UnpicklableError
from taskplex.executor import Executor
from taskplex.journal import Journal
from taskplex.progress import ProgressBar
from taskplex.server import Server

__all__ = ["run_map"]

_MIN_WINDOW = 4096
_POLL_SECONDS = 0.1
"""How often a waiting loop looks whether Ctrl-C was pressed."""


def run_map(
    function_reference: str,
    *,
    inputs: str,
    output: str,
    backend: str,
    options: dict[str, Any],
    journal: Journal | None = None,
) -> int:
    """Run the command; return its exit status (0 all succeeded, 1 some failed, 130 Ctrl-C)."""
    function = import_callable(function_reference)
    # Created, not started: an unknown backend or option fails before any file is touched.
    server = plugins.create_server(backend, **options)
    interrupts = _Interrupts()
    with (
        _open_inputs(inputs) as input_stream,
        _open_output(output) as output_stream,
        ProgressBar(_count_tasks(inputs), shown=ProgressBar.on_a_terminal()) as progress,
        interrupts.installed(),
    ):
        started = time.perf_counter()
        executor = Executor(server, journal=journal)
        interrupts.server = server
        run = _MapRun(executor, function, output_stream, progress, interrupts)
        try:
            run.submit_all(_task_lines(input_stream, inputs))
            run.wait_all()
            if interrupts.count:
                progress.note(
                    "taskplex map: interrupted; cancelling queued tasks and waiting for running "
                    "ones (Ctrl-C again to cancel those too)"
                )
        finally:
            # Also on an unexpected error: no task may run on, and no worker may outlive the run.
            executor.shutdown(wait=True, cancel_futures=True)
            run.write_ready(final=True)
            progress.close(finished=run.tally.succeeded + run.tally.failed)
        elapsed = time.perf_counter() - started
    tally = run.tally
    print(tally.summary(elapsed, backend, server, interrupted=interrupts.count > 0), file=sys.stderr)
    if run.output_error is not None:
        where = "stdout" if output == "-" else output
        print(f"taskplex map: error: cannot write {where}: {run.output_error}", file=sys.stderr)
    if interrupts.count:
        return EXIT_INTERRUPTED
    return 1 if tally.failed or tally.cancelled or run.output_error else 0


class _Tally:
    def __init__(self) -> None:
        self.succeeded = self.failed = self.cancelled = 0

    def summary(self, elapsed: float, backend: str, server: Server, *, interrupted: bool) -> str:
        rate = (self.succeeded + self.failed) / elapsed if elapsed > 0 else 0.0
        return (
            f"taskplex map: {'interrupted: ' if interrupted else ''}{self.succeeded} succeeded, "
            f"{self.failed} failed, {self.cancelled} cancelled in {elapsed:.2f} s "
            f"({rate:.1f} tasks/s) "
            f"on {backend} (workers={getattr(server, 'workers', '?')})"
        )


class _MapRun:
    """Submits tasks while the window has room and writes their records in input order."""

    def __init__(
        self,
        executor: Executor,
        function: Callable[..., Any],
        output: IO[str],
        progress: ProgressBar,
        interrupts: _Interrupts,
    ) -> None:
        self.executor = executor
        self.function = function
        self.output = output
        self.output_error: OSError | None = None
        self.progress = progress
        self.interrupts = interrupts
        self.window = max(_MIN_WINDOW, 4 * executor.server.workers)
        self.unwritten: dict[int, cf.Future[Any] | dict[str, Any]] = {}
        """Futures, or records of tasks that failed without running, by index."""
        self.next_to_write = 0
        self.completions: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.tally = _Tally()

    @property
    def stopping(self) -> bool:
        return bool(self.interrupts.count) or self.output_error is not None

    def submit_all(self, lines: Iterator[tuple[str, bytes]]) -> None:
        for index, (location, line) in enumerate(lines):
            if len(self.unwritten) >= self.window:
                # Refill in bursts rather than one task per completion: fewer wake-ups and
                # bigger submission batches.
                while len(self.unwritten) > self.window * 3 // 4 and not self.stopping:
                    self._wait_for_completions()
            if self.stopping:
                return
            self._submit(index, location, line)
            if not self.completions.empty():
                self._take_completions()

    def wait_all(self) -> None:
        while self.unwritten and not self.stopping:
            self._wait_for_completions()

    def _submit(self, index: int, location: str, line: bytes) -> None:
        try:
            value = json.loads(line)
        except ValueError as exc:  # also bytes that are not UTF-8
            self._failed_without_running(index, exc, f"{location}: not valid JSON: {exc}")
            return
        if isinstance(value, list):
            args, kwargs = value, {}
        elif isinstance(value, dict):
            args, kwargs = [], value
        else:
            args, kwargs = [value], {}
        try:
            future = self.executor.submit(self.function, *args, **kwargs)
        except Exception as exc:
            if self.interrupts.count:
                return  # a second Ctrl-C stopped the server meanwhile: the task never was
            self._failed_without_running(index, exc, f"{location}: the backend refused it: {exc}")
            return
        self.unwritten[index] = future
        future.add_done_callback(self._completed)

    def _failed_without_running(self, index: int, exc: Exception, message: str) -> None:
        self.unwritten[index] = {
            "index": index,
            "ok": False,
            "error": {"type": _type_name(exc), "message": message, "traceback": None},
        }
        self.progress.advance(1)
        self.write_ready()

    def _completed(self, future: cf.Future[Any]) -> None:
        self.completions.put(None)  # runs in the executor's thread: only wake the calling thread

    def _wait_for_completions(self) -> None:
        self._flush()
        try:
            self.completions.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            return
        self.progress.advance(1)
        self._take_completions()

    def _take_completions(self) -> None:
        count = 0
        while not self.completions.empty():
            self.completions.get_nowait()
            count += 1
        self.progress.advance(count)
        self.write_ready()

    def write_ready(self, *, final: bool = False) -> None:
        """Write records from ``next_to_write`` on, as long as they are ready.

        ``final``: the executor has shut down, so a future still pending never reached the
        backend; it counts as cancelled.
        """
        while (entry := self.unwritten.get(self.next_to_write)) is not None:
            if isinstance(entry, cf.Future):
                if not entry.done() and not final:
                    return
                record = self._record_of(self.next_to_write, entry)
            else:
                record = entry
                self.tally.failed += 1
            del self.unwritten[self.next_to_write]
            self.next_to_write += 1
            if record is not None:
                self._write(record)
        if final:
            self._flush()

    def _record_of(self, index: int, future: cf.Future[Any]) -> dict[str, Any] | None:
        """The record of a finished task, or None for a cancelled one (not written)."""
        if not future.done() or future.cancelled():
            self.tally.cancelled += 1
            return None
        exc = future.exception()
        if exc is None:
            self.tally.succeeded += 1
            return {"index": index, "ok": True, "result": future.result()}
        if isinstance(exc, TaskCancelled):
            self.tally.cancelled += 1
            return None
        self.tally.failed += 1
        self.progress.show_failed(self.tally.failed)
        return {"index": index, "ok": False, "error": _describe(exc)}

    def _write(self, record: dict[str, Any]) -> None:
        if self.output_error is not None:
            return
        try:
            line = json.dumps(record)
        except (TypeError, ValueError, RecursionError):
            line = json.dumps({**record, "result": _safe_repr(record["result"]), "repr": True})
        try:
            self.output.write(line + "\n")
        except OSError as exc:
            self._output_failed(exc)

    def _flush(self) -> None:
        if self.output_error is not None:
            return
        try:
            self.output.flush()
        except OSError as exc:
            self._output_failed(exc)

    def _output_failed(self, exc: OSError) -> None:
        self.output_error = exc
        if self.output is sys.stdout:
            discard_stdout()


def _describe(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, UnpicklableError):
        type_name, message = exc.type_name, exc.message
    else:
        type_name, message = _type_name(exc), str(exc)
    return {
        "type": type_name,
        "message": message,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<{type(value).__qualname__} whose repr failed: {type(exc).__name__}>"


# ---------------------------------------------------------------------------------------------------
# input, output, progress, Ctrl-C
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_inputs(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise CommandLineError(f"cannot read --inputs {path}: {exc.strerror}") from None
    with stream:
        yield stream


@contextlib.contextmanager
def _open_output(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
        return
    try:
        stream = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise CommandLineError(f"cannot write --output {path}: {exc.strerror}") from None
    with stream:
        yield stream


def _task_lines(stream: IO[bytes], path: str) -> Iterator[tuple[str, bytes]]:
    """The non-blank lines, each with ``path:line-number`` for messages."""
    for number, line in enumerate(stream, 1):
        if line.strip():
            yield f"{path}:{number}", line


def _count_tasks(path: str) -> int | None:
    """The number of non-blank lines, for the progress bar; only when a bar is shown."""
    if path == "-" or not ProgressBar.on_a_terminal():
        return None
    with open(path, "rb") as stream:
        return sum(1 for line in stream if line.strip())


class _Interrupts:
    """Counts Ctrl-C presses instead of raising KeyboardInterrupt at an arbitrary line.

    The map loop polls ``count``, so a press never tears a submission or a record in half. The
    handler prints nothing: writing to stderr from a signal handler can re-enter a write in progress.
    """

    def __init__(self) -> None:
        self.count = 0
        self.server: Server | None = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self.server is not None:
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    self.server.cancel()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        try:
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C is the caller's business
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
