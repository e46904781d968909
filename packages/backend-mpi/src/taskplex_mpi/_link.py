"""The server's end of the conversation with its worker ranks: one thread makes every MPI call.

MPI calls block, and a blocking receive spins, so none happen on the server's event loop. The
link's thread sends what :meth:`RankLink.send` queued (non-blocking sends, so a rank busy with a
long task never holds up the others), receives every message that has arrived, and hands the
received batch to ``deliver`` in one call. When it has nothing to do it waits on an event with a
pause that grows up to a millisecond; :meth:`RankLink.send` wakes it at once.

:meth:`RankLink.close` sends STOP to every rank and waits, within a bound, for each to say
STOPPED; a rank still busy with a task that never returns cannot be stopped by MPI, and is named.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskplex_mpi._protocol import ORDERS, STOP, STOPPED

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["RankLink"]

logger = logging.getLogger("taskplex.mpi")

MAX_PAUSE = 1e-3

Received = list[tuple[int, list[tuple[Any, ...]]]]
"""(rank, events) for each message received, in the order received."""


class RankLink:
    """Talks with ``ranks`` of ``comm``: orders go out on tag ORDERS, replies come on ``reply_tag``."""

    def __init__(
        self,
        comm: MPI.Comm,
        ranks: Sequence[int],
        reply_tag: int,
        deliver: Callable[[Received], None],
        *,
        name: str,
    ) -> None:
        self.comm = comm
        self.ranks = list(ranks)
        self.reply_tag = reply_tag
        self._deliver = deliver
        self._outbox: collections.deque[tuple[int, list[tuple[Any, ...]]]] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._stopped: set[int] = set()
        self.unstopped: list[int] = []
        """Ranks that did not answer STOP within the bound given to :meth:`close`."""
        self._stop_deadline = 0.0
        self.ended = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, rank: int, orders: list[tuple[Any, ...]]) -> None:
        """Send ``orders`` to ``rank`` (from any thread; they go out in the order given)."""
        self._outbox.append((rank, orders))
        self._wake.set()

    def close(self, timeout: float) -> None:
        """Tell every rank to STOP; the thread ends once all said STOPPED, or after ``timeout``."""
        for rank in self.ranks:
            self._outbox.append((rank, [(STOP,)]))
        self._stop_deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # an MPI error: the backend fails the server with it
            self.failure = exc
            self._deliver([])
        finally:
            self.ended.set()

    def _serve(self) -> None:
        from mpi4py import MPI

        comm, tag, outbox, wake = self.comm, self.reply_tag, self._outbox, self._wake
        status = MPI.Status()
        sending: list[MPI.Request] = []
        pause = 0.0
        while True:
            wake.clear()
            busy = False
            if outbox:
                batches: dict[int, list[tuple[Any, ...]]] = {}
                while outbox:
                    rank, orders = outbox.popleft()
                    batches.setdefault(rank, []).extend(orders)
                for rank, orders in batches.items():  # one message per rank, orders in order
                    sending.append(comm.isend(orders, dest=rank, tag=ORDERS))
                busy = True
            received: Received = []
            while comm.iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
                source = status.Get_source()
                events = comm.recv(source=source, tag=tag)
                received.append((source, events))
                if events and events[-1][0] == STOPPED:
                    self._stopped.add(source)
            if received:
                self._deliver(received)
                busy = True
            if sending:
                sending = [request for request in sending if not request.Test()]
            if self._closing and not outbox:
                if len(self._stopped) == len(self.ranks) and not sending:
                    return
                if time.monotonic() > self._stop_deadline:
                    self.unstopped = sorted(set(self.ranks) - self._stopped)
                    for request in sending:  # orders to ranks that never read them
                        request.Cancel()
                    return
            if busy:
                pause = 0.0
            else:
                wake.wait(pause)
                pause = min(pause * 1.25 or 1e-5, MAX_PAUSE)
