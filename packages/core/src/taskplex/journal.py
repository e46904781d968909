"""A restart journal: finished tasks' outcomes on disk, so that a re-run does only what is left.

``taskplex.Executor(..., journal="run.db")`` (or ``server.journal = "run.db"`` before a server
starts, or ``taskplex map ... --journal run.db``) records each task's key
(:func:`taskplex.keys.task_key`) and outcome when it finishes. A later run with the same journal
finishes a task whose key is recorded as succeeded with the recorded result, without running it;
its ``worker`` is ``"journal"``. Failed tasks (the function raised) are recorded too, and run
again unless the journal was opened with ``rerun_failed=False``, which restores their exception.
Cancelled tasks and infrastructure failures are not recorded: they always run again.

The journal is one SQLite file. Writes are batched and made by a thread of the journal's own, off
the server's event loop; a task's outcome reaches the file shortly after the task is delivered,
so a run killed in between runs that task again (never the other way round: nothing is restored
that did not finish). SQLite's locking makes it safe for several writers, also across processes
and on a shared filesystem whose locks work (NFS with a lock daemon, Lustre, GPFS). A file that is
not a taskplex journal, is corrupt, or was written by a newer format is refused with
:class:`~taskplex.errors.JournalError`; an entry that cannot be read back runs its task again.
``taskplex journal show run.db`` lists what a journal holds.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskplex.errors import InvalidOption, JournalError, TaskplexError
from taskplex.keys import KEY_VERSION

if TYPE_CHECKING:
    from taskplex.task import Outcome, Task

__all__ = ["Entry", "Journal"]

logger = logging.getLogger(__name__)

APPLICATION_ID = 0x54504A4C  # "TPJL"
"""SQLite's ``application_id`` of a taskplex journal: tells it from other programs' databases."""
FORMAT = 1
"""The journal's format (SQLite ``user_version``); a newer one is refused, never misread."""
BATCH = 2048
"""Most outcomes written in one transaction."""
BUSY_TIMEOUT = 60.0
"""Seconds a write waits for another writer's lock before the batch is reported lost."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    key TEXT PRIMARY KEY,
    ok INTEGER NOT NULL,
    value BLOB,
    name TEXT,
    function TEXT,
    finished_at REAL NOT NULL,
    key_version INTEGER NOT NULL
)
"""


@dataclass(frozen=True)
class Entry:
    """One recorded outcome, as ``taskplex journal show`` lists it."""

    key: str
    ok: bool
    name: str | None
    function: str | None
    finished_at: float
    size: int


class Journal:
    """A restart journal in the SQLite file ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike[str], *, rerun_failed: bool = True) -> None:
        if not isinstance(path, str | os.PathLike):
            raise InvalidOption(f"journal must be a file path or a Journal, got {path!r}")
        if not isinstance(rerun_failed, bool):
            raise InvalidOption(f"rerun_failed must be True or False, got {rerun_failed!r}")
        self.path = Path(path)
        self.rerun_failed = rerun_failed
        self._lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._done: dict[str, bool] = {}
        self._writes: queue.SimpleQueue[tuple[Any, ...] | threading.Event | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._written = 0
        self._lost = 0
        self._open_checked()

    def __repr__(self) -> str:
        return f"<taskplex.Journal {str(self.path)!r}>"

    # ------------------------------------------------------------------ opening

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {str(self.path)!r}: {exc}") from exc
        return connection

    def _open_checked(self) -> None:
        """Open the file, create the journal if it is new, refuse it if it is not ours."""
        if self.path.is_dir():
            raise JournalError(f"the journal {str(self.path)!r} is a directory; name a file")
        connection = self._connect()
        try:
            application_id = connection.execute("PRAGMA application_id").fetchone()[0]
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            if application_id == 0 and not tables:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {FORMAT}")
                connection.execute(_SCHEMA)
                connection.execute("COMMIT")
            elif application_id != APPLICATION_ID:
                raise JournalError(
                    f"{str(self.path)!r} is an SQLite database of another program, not a taskplex "
                    "journal; name a new file for the journal"
                )
            elif version > FORMAT:
                raise JournalError(
                    f"the journal {str(self.path)!r} has format {version}, written by a newer "
                    f"taskplex (this one reads format {FORMAT}); upgrade taskplex-core or name a "
                    "new file"
                )
            problem = connection.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise JournalError(
                    f"the journal {str(self.path)!r} is corrupt ({problem}); move it away and "
                    "start a new one (its finished tasks will run again)"
                )
            self._done = {
                key: bool(ok)
                for key, ok in connection.execute(
                    "SELECT key, ok FROM outcomes WHERE key_version = ?", (KEY_VERSION,)
                )
            }
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise JournalError(
                f"{str(self.path)!r} is not a taskplex journal or is corrupt ({exc}); name a new "
                "file for the journal"
            ) from exc
        except BaseException:
            connection.close()
            raise
        self._reader = connection

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        """Outcomes recorded when the journal was opened."""
        return len(self._done)

    def lookup(self, task: Task) -> Outcome | None:
        """The recorded outcome of ``task`` (by its key) to finish it with, or None to run it."""
        key = task.key
        if key is None:
            return None
        ok = self._done.get(key)
        if ok is None or (not ok and self.rerun_failed):
            return None
        from taskplex.task import Outcome

        with self._lock:
            if self._reader is None:
                return None
            row = self._reader.execute("SELECT value FROM outcomes WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            value = _loads(row[0])
        except Exception as exc:
            logger.warning(
                "journal %s: the outcome of %r cannot be read back (%s: %s); running it again",
                self.path,
                task,
                type(exc).__name__,
                exc,
            )
            return None
        if ok:
            return Outcome(result=value)
        from taskplex.errors import restore_exception

        return Outcome(exception=restore_exception(value))

    def entries(self) -> Iterator[Entry]:
        """Every recorded outcome, oldest first."""
        with self._lock:
            if self._reader is None:
                return
            rows = self._reader.execute(
                "SELECT key, ok, name, function, finished_at, length(value) FROM outcomes "
                "ORDER BY finished_at"
            ).fetchall()
        for key, ok, name, function, finished_at, size in rows:
            yield Entry(key, bool(ok), name, function, finished_at, size or 0)

    # ------------------------------------------------------------------ writing

    def record(self, task: Task) -> None:
        """Queue the outcome of a finished ``task`` for writing (any thread; never blocks)."""
        from taskplex.task import TaskStatus

        if task.key is None or task.worker == "journal":
            return
        if task.status is TaskStatus.SUCCEEDED:
            ok, value = True, task.result
        elif task.status is TaskStatus.FAILED and not isinstance(task.exception, TaskplexError):
            ok, value = False, task.exception
        else:
            return
        function = getattr(task.function, "__qualname__", None) or type(task.function).__qualname__
        module = getattr(task.function, "__module__", None)
        entry = (task.key, ok, value, task.name, f"{module}.{function}" if module else function)
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_loop, name=f"taskplex-journal {self.path.name}", daemon=True
                    )
                    self._writer.start()
        self._writes.put(entry)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything recorded so far is on disk; False if ``timeout`` passed first."""
        if self._writer is None:
            return True
        done = threading.Event()
        self._writes.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then close the file. The journal can be opened again later."""
        writer = self._writer
        if writer is not None:
            self._writes.put(None)
            writer.join(timeout)
            self._writer = None
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def reopen(self) -> None:
        """Open a closed journal again, re-reading what it holds (a server starting again)."""
        if self._reader is None:
            self._open_checked()

    @property
    def lost(self) -> int:
        """Outcomes that could not be written (their tasks will run again in a re-run)."""
        return self._lost

    def _write_loop(self) -> None:
        connection = self._connect()
        try:
            stop = False
            while not stop:
                batch: list[tuple[Any, ...]] = []
                waiters: list[threading.Event] = []
                item = self._writes.get()
                while True:
                    if item is None:
                        stop = True
                    elif isinstance(item, threading.Event):
                        waiters.append(item)
                    else:
                        batch.append(item)
                    if len(batch) >= BATCH:
                        break
                    try:
                        item = self._writes.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._write(connection, batch)
                for waiter in waiters:
                    waiter.set()
        finally:
            connection.close()

    def _write(self, connection: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
        rows = []
        now = time.time()
        for key, ok, value, name, function in batch:
            try:
                data = _dumps(value) if ok else _dumps_exception(value)
            except Exception as exc:
                self._lost += 1
                logger.warning(
                    "journal %s: the outcome of task %s cannot be pickled (%s); it is not "
                    "recorded and will run again in a re-run",
                    self.path,
                    name or key,
                    exc,
                )
                continue
            rows.append((key, int(ok), data, name, function, now, KEY_VERSION))
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            connection.execute("COMMIT")
            self._written += len(rows)
        except sqlite3.Error as exc:
            self._lost += len(rows)
            logger.error(
                "journal %s: %d outcome(s) could not be written (%s); their tasks will run again "
                "in a re-run",
                self.path,
                len(rows),
                exc,
            )
            if connection.in_transaction:
                connection.execute("ROLLBACK")


def as_journal(value: Journal | str | os.PathLike[str] | None) -> Journal | None:
    """A journal from what a user passed as ``journal=``: a path, a Journal, or None."""
    if value is None or isinstance(value, Journal):
        return value
    return Journal(value)


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(value, pickle.HIGHEST_PROTOCOL))


def _dumps_exception(exc: BaseException) -> bytes:
    from taskplex.errors import capture_exception

    return pickle.dumps(capture_exception(exc), pickle.HIGHEST_PROTOCOL)


def _loads(data: bytes) -> Any:
    return pickle.loads(data)
