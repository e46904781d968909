"""Options and capabilities, checked without starting MPI."""

from __future__ import annotations

import pytest

import taskplex
from taskplex_mpi import MPIServer, comm


def test_an_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(taskplex.InvalidOption) as caught:
        taskplex.create_server("mpi", ranks=4)
    for name in ("mode", "mpiexec", "prefetch", "spawn_timeout", "workers"):
        assert name in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("mode", "cluster", "mode must be one of auto, spawn, world"),
        ("prefetch", -1, "prefetch must be an int >= 0"),
        ("prefetch", True, "prefetch must be an int >= 0"),
        ("spawn_timeout", 0, "spawn_timeout must be > 0"),
        ("mpiexec", 3, "mpiexec must be a path"),
    ],
)
def test_bad_option_values_are_refused_with_what_was_wrong(
    option: str, value: object, said: str
) -> None:
    with pytest.raises(taskplex.InvalidOption, match=said):
        MPIServer(workers=1, **{option: value})  # type: ignore[arg-type]


def test_capabilities_say_what_mpi_allows() -> None:
    prefetching = MPIServer(workers=1).capabilities
    assert not prefetching.withdraws_launched  # a task sent ahead may begin before a cancel
    assert MPIServer(workers=1, prefetch=0).capabilities.withdraws_launched
    assert prefetching.remote
    assert prefetching.forwards_logs
    assert prefetching.resources == frozenset({"cores"})
    # MPI cannot interrupt a rank
    assert not prefetching.cancel_running
    assert not prefetching.timeout_kills_work
    # a dead rank ends its job: the spawn host's is replaced, a world cannot be
    assert MPIServer(workers=1, mode="spawn").capabilities.survives_worker_death
    assert not MPIServer(workers=1, mode="world").capabilities.survives_worker_death


def test_the_task_communicator_is_only_there_inside_a_task() -> None:
    with pytest.raises(RuntimeError, match="inside a task"):
        comm()
