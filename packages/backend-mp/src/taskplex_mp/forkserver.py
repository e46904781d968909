"""The fork server: one fresh interpreter per server that forks workers on request.

With ``start_method="forkserver"`` the server starts this process once (a new interpreter, like
spawn) and asks it for each worker. Forking from it is fast (its imports are already done) and
safe (it has no threads and none of the caller's state). Data flow::

    server ── fork request, with the worker's two pipe ends (SCM_RIGHTS) ──► fork server ─► worker
    server ◄── FORKED (request id, pid) / EXITED (pid, exit code) ────────── fork server

The fork server is the workers' parent, so it reaps them and reports how each ended. It exits when
the server closes the socket, and dies with the server (Linux) or at that socket's end elsewhere;
either way it kills the process groups of the workers it still has as it goes.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys

from taskplex.serialization import loads
from taskplex_mp._frames import EXITED, FORKED, HELLO, SIGNED, SIZE, frame
from taskplex_mp.worker import die_with_parent, flush_output, run_forked

__all__ = ["main"]

REQUEST = SIZE
"""A fork request: the request id, sent with the worker's task and result fds attached."""


def main() -> None:
    """Entry point: ``-c`` with the socket's fd and the server's pid as arguments."""
    sock_fd, server_pid = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(server_pid)
    os.setpgid(0, 0)
    sock = socket.socket(fileno=sock_fd)
    config = loads(sock.recv(1 << 20))
    sys.path[:] = config["sys_path"]
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    # a handler (not SIG_DFL) so that SIGCHLD reaches the wake-up pipe
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children: set[int] = set()
    try:
        sock.send(frame(HELLO, os.getpid()))
        _serve(sock, wake_r, children, close_in_child=[sock_fd, wake_r, wake_w])
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        flush_output()


def _serve(sock: socket.socket, wake_r: int, children: set[int], close_in_child: list[int]) -> None:
    me = os.getpid()
    sock_fd = sock.fileno()
    poller = select.poll()  # not select: the socket keeps the caller's fd number, maybe over 1024
    poller.register(sock_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        readable = {fd for fd, _ in poller.poll()}
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            _reap(sock, children)
        if sock_fd in readable:
            message, fds, _, _ = socket.recv_fds(sock, REQUEST.size, 2)
            if not message:
                return  # the server closed the socket, or died
            (request_id,) = REQUEST.unpack(message)
            task_fd, result_fd = fds
            pid = os.fork()
            if pid == 0:
                run_forked(task_fd, result_fd, me, close_in_child)
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            os.close(task_fd)
            os.close(result_fd)
            children.add(pid)
            sock.send(frame(FORKED, request_id, SIGNED.pack(pid)))


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        sock.send(frame(EXITED, pid, SIGNED.pack(os.waitstatus_to_exitcode(status))))
