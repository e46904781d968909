"""The reaper: a tiny process that kills the workers' process groups when the server goes away.

A worker dies with the server (the kernel sends it SIGKILL when its parent ends), but what its task
started — a solver, a ``sleep`` — lives in the worker's process group and would outlive both. The
server starts one reaper and tells it, over a pipe, each worker's process group as the worker
starts (``+pid``) and ends (``-pid``). When the pipe ends — the server stopped, exited, or was
killed with SIGKILL, or its program was interrupted twice — the reaper kills every group it still
knows, and exits.

It runs in a session of its own and ignores Ctrl-C, so a terminal's interrupt cannot take it away
before it has done its job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

__all__ = ["main"]


def main() -> None:
    """Read ``+pgid`` / ``-pgid`` lines from stdin; at its end, kill the groups still listed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        try:
            pgid = int(line[1:])
        except ValueError:
            continue
        if line.startswith(b"+"):
            groups.add(pgid)
        else:
            groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    main()
