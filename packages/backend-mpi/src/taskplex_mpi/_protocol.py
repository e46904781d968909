"""What the server and its worker ranks say to each other: pickled lists of tuples, one list a message.

Server to a worker rank (tag :data:`ORDERS`), each message a list of orders, obeyed in order::

    (CONFIGURE, sys_path, levels, reply_tag)   once, first: the caller's sys.path and logger levels
    (LEVELS, levels)                           the caller changed its logger levels since
    (RUN, attempt_id, payload, group)          run a task; group: the ranks that run it together
    (STOP,) or (STOP, EXIT)                    leave the serving loop (with EXIT: for good)

Worker rank to server (tag ``reply_tag``), each message a list of events::

    (STARTED, attempt_id, where)               the function is about to be called on this rank
    (DONE, attempt_id, failed, data, seconds)  dumps_result(...) or dumps_exception(...), and
                                               how long the call took
    (LOG, packed_record)                       a record logged by the task, to re-emit in the caller
    (STOPPED,)                                 the rank left its serving loop

MPI keeps the order of messages between two ranks on one communicator and tag, so a rank's
STARTED always arrives before its DONE, and an order list is always obeyed in the order sent.
"""

from __future__ import annotations

__all__ = [
    "CONFIGURE",
    "DONE",
    "EXIT",
    "LEVELS",
    "LOG",
    "ORDERS",
    "RUN",
    "SPAWN_REPLY_TAG",
    "STARTED",
    "STOP",
    "STOPPED",
    "USER_TMPDIR",
]

ORDERS = 1
"""The tag of the server's messages to its worker ranks."""
SPAWN_REPLY_TAG = 2
"""The tag of worker replies in spawn mode (each job of spawned ranks has one server)."""

CONFIGURE, LEVELS, RUN, STOP = 0, 1, 2, 3
EXIT = "exit"
STARTED, DONE, LOG, STOPPED = 10, 11, 12, 13

USER_TMPDIR = "TASKPLEX_MPI_USER_TMPDIR"
"""Spawned ranks: the caller's ``TMPDIR`` ("" when it had none), to restore; see ``_hostlink``."""
