"""Spawn mode: start worker ranks from a plain ``python`` with ``MPI_Comm_spawn``, or say why not.

A process that was not started by ``mpiexec`` (an MPI "singleton") can only spawn through the
process manager of its own MPI library: MPICH starts the ``mpiexec`` it finds first on ``PATH``,
Open MPI the ``prte`` next to it. With another MPI's launcher first on ``PATH`` (a system MPICH
beside a pip-installed one, say), or none, the spawn does not fail: it hangs for ever. So before
spawning, :func:`find_launcher` finds the launcher that belongs to the library mpi4py loaded —
the one given, else the one beside this interpreter (where ``pip install mpich`` puts it), else
the first on ``PATH`` — asks it for its version, and refuses with a message that says how to fix
it when it is missing or belongs to another MPI. The spawn itself is also bounded by the backend.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from taskplex.errors import BackendUnavailable

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["Launcher", "find_launcher", "library", "spawn_workers"]

VERSION_TIMEOUT = 20.0
"""Seconds ``mpiexec --version`` may take."""

WORKER_COMMAND = "from taskplex_mpi.worker import main; main()"

ROOT_CONSENT = (
    "OMPI_ALLOW_RUN_AS_ROOT",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
    "PRTE_ALLOW_RUN_AS_ROOT",
    "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM",
)
"""What Open MPI's launcher and its runtime (PRRTE) want set to 1 before they run as root."""

HOW_TO_FIX = (
    "put the mpiexec of the MPI that mpi4py uses first on PATH or pass mpiexec=PATH "
    "(with the MPICH wheel: pip install mpich, whose mpiexec lands beside this python), "
    "or start the program under mpiexec: mpiexec -n N python -m taskplex_mpi script.py"
)


@dataclass(frozen=True)
class Launcher:
    """An ``mpiexec`` and the MPI it belongs to."""

    path: str
    family: str
    version: str


def library() -> tuple[str, str]:
    """(family, version) of the MPI library mpi4py loaded: family is "mpich" or "openmpi"."""
    from mpi4py import MPI

    return _identify(MPI.Get_library_version())


def _identify(text: str) -> tuple[str, str]:
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text or "prte" in text:
        family = "openmpi"
    elif "MPICH" in text or "HYDRA" in text or "Hydra" in text:
        family = "mpich"
    else:
        family = "unknown"
    found = re.search(r"(?:Version:\s*|v|\) )(\d+\.\d+(?:\.\d+)?)", text)
    return family, found.group(1) if found else "unknown"


def find_launcher(mpiexec: str | None = None) -> Launcher:
    """The ``mpiexec`` to spawn with, checked to belong to mpi4py's MPI; BackendUnavailable if none."""
    family, version = library()
    if mpiexec is not None:
        candidates = [mpiexec]
    else:
        beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        candidates = [beside] if os.access(beside, os.X_OK) else []
        on_path = shutil.which("mpiexec")
        if on_path is not None:
            candidates.append(on_path)
    if not candidates:
        raise BackendUnavailable(
            f"spawn mode needs an mpiexec and none was found (mpi4py uses {family} {version}); "
            + HOW_TO_FIX
        )
    seen = []
    for path in candidates:
        try:
            answer = subprocess.run(
                [path, "--version"],
                capture_output=True,
                text=True,
                timeout=VERSION_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            seen.append(f"{path} ({type(exc).__name__}: {exc})")
            continue
        its_family, its_version = _identify(answer.stdout + answer.stderr)
        if (its_family, its_version) == (family, version):
            return Launcher(os.path.abspath(path), family, version)
        seen.append(f"{path} ({its_family} {its_version})")
    raise BackendUnavailable(
        f"spawn mode needs the mpiexec of {family} {version}, the MPI mpi4py uses, and found only "
        f"{', '.join(seen)}: spawning with another MPI's launcher hangs; " + HOW_TO_FIX
    )


def prepare_environment(launcher: Launcher) -> None:
    """Make the spawn find ``launcher``: its directory goes first on this process's PATH.

    As root, Open MPI spawns only with its four consent variables set; BackendUnavailable says so.

    MPICH starts the process manager of a singleton by looking ``mpiexec`` up on ``PATH`` at the
    first spawn, so the change cannot be confined to the call.
    """
    directory = os.path.dirname(launcher.path)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [directory]:
        os.environ["PATH"] = os.pathsep.join([directory, path]) if path else directory
    if launcher.family == "openmpi" and os.geteuid() == 0:
        missing = [name for name in ROOT_CONSENT if os.environ.get(name) != "1"]
        if missing:
            raise BackendUnavailable(
                "Open MPI refuses to spawn as root unless told that it is intended (in a "
                f"container, say): set {', '.join(f'{name}=1' for name in missing)}"
            )


def spawn_workers(python: str, count: int) -> MPI.Intercomm:
    """Spawn ``count`` worker ranks running :func:`taskplex_mpi.worker.main` (blocks)."""
    from mpi4py import MPI

    info = MPI.Info.Create()
    try:
        if library()[0] == "openmpi":
            info.Set("map_by", ":OVERSUBSCRIBE")
        return MPI.COMM_SELF.Spawn(python, ["-c", WORKER_COMMAND], maxprocs=count, info=info)
    finally:
        info.Free()
