"""The fixtures every test class of the suite shares, and how the backend under test is chosen."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pytest

from taskplex.conformance import requirements
from taskplex.conformance._support import Markers, ProcessTable, bounded_call, serving
from taskplex.errors import BackendUnavailable, UnknownBackend
from taskplex.executor import Executor
from taskplex.plugins import backends, create_server, get_server_class
from taskplex.server import Capabilities
from taskplex.serverbase import ServerBase

EVERY_INSTALLED_BACKEND = "*"
"""The ``backend`` of the suite's own test modules: parametrised over the installed backends."""

_NO_BACKEND = "(none installed)"

MakeServer = Callable[..., ServerBase]
MakeExecutor = Callable[..., Executor]
Serve = Callable[[ServerBase], AbstractAsyncContextManager[ServerBase]]


@dataclass(frozen=True)
class BackendUnderTest:
    """The backend a test runs against."""

    name: str
    server_class: type[ServerBase]

    @property
    def capabilities(self) -> Capabilities:
        return self.server_class.capabilities

    @property
    def pickles_tasks(self) -> bool:
        return requirements.declares(self.capabilities, "pickles_tasks")


class SuiteBase:
    """Fixtures shared by the suite's test classes. A backend's subclass may override any of them.

    Set ``backend`` to an installed backend's name or to a server class. ``server_options`` gives
    the options the server is created with (by default the server class's
    ``conformance_options(tmp_path)``); the suite adds ``workers`` and ``queue_size``.
    """

    backend: ClassVar[str | type[ServerBase] | None] = None
    taskplex_suite: ClassVar[bool] = True
    """Marks the classes of the suite (the plugin gives their tests a default timeout)."""

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if self.backend != EVERY_INSTALLED_BACKEND:
            return
        if "taskplex_backend" not in metafunc.fixturenames:
            return
        names = metafunc.config.getoption("taskplex_backend", None) or [info.name for info in backends()]
        metafunc.parametrize("taskplex_backend", names or [_NO_BACKEND], indirect=True)

    # ------------------------------------------------------------------ the backend

    @pytest.fixture(scope="class")
    @classmethod
    def taskplex_backend(cls, request: pytest.FixtureRequest) -> BackendUnderTest:
        """The backend under test, from the class's ``backend`` or the discovery parameter."""
        chosen = getattr(request, "param", cls.backend)
        if chosen is None:
            pytest.fail(
                f"{cls.__name__} must set the class attribute `backend` to a backend name or a "
                "server class"
            )
        if chosen == _NO_BACKEND:
            _unavailable(request.config, "no taskplex backend is installed")
        if isinstance(chosen, str):
            try:
                server_class = get_server_class(chosen)
            except UnknownBackend as exc:
                pytest.fail(str(exc))
            name = chosen
        else:
            server_class, name = chosen, chosen.__name__
        if not (isinstance(server_class, type) and issubclass(server_class, ServerBase)):
            pytest.fail(
                f"backend {name!r} is {server_class!r}; the suite needs a taskplex.ServerBase subclass"
            )
        return BackendUnderTest(name, server_class)

    @pytest.fixture(autouse=True)
    def _capability_gate(
        self, request: pytest.FixtureRequest, taskplex_backend: BackendUnderTest
    ) -> None:
        reason = requirements.unmet(request.node, taskplex_backend.name, taskplex_backend.capabilities)
        if reason is not None:
            pytest.skip(reason)

    @pytest.fixture
    def capabilities(self, taskplex_backend: BackendUnderTest) -> Capabilities:
        return taskplex_backend.capabilities

    @pytest.fixture
    def server_options(
        self, request: pytest.FixtureRequest, taskplex_backend: BackendUnderTest, tmp_path: Path
    ) -> dict[str, Any]:
        """Options for a server that runs here; override to supply your own."""
        workdir = tmp_path / "backend"
        workdir.mkdir()
        try:
            return dict(taskplex_backend.server_class.conformance_options(workdir))
        except BackendUnavailable as exc:
            _unavailable(request.config, f"backend {taskplex_backend.name!r} cannot run here: {exc}")

    # ------------------------------------------------------------------ servers and executors

    @pytest.fixture
    def make_server(
        self, taskplex_backend: BackendUnderTest, server_options: dict[str, Any]
    ) -> MakeServer:
        """``make_server(workers=1, queue_size=0)``: a new, not yet started server."""

        def make(workers: int = 1, queue_size: int = 0) -> ServerBase:
            options = {**server_options, "workers": workers, "queue_size": queue_size}
            server = create_server(taskplex_backend.server_class, **options)
            assert isinstance(server, ServerBase)
            return server

        return make

    @pytest.fixture
    def serve(self, markers: Markers) -> Serve:
        """``async with serve(server):`` runs the server for the block and stops it after."""
        return functools.partial(serving, markers=markers)

    @pytest.fixture
    def make_executor(self, make_server: MakeServer, markers: Markers) -> Iterator[MakeExecutor]:
        """``make_executor(workers=1, queue_size=0)``: a running Executor, shut down after the test."""
        made: list[Executor] = []

        def make(workers: int = 1, queue_size: int = 0) -> Executor:
            server = make_server(workers=workers, queue_size=queue_size)
            executor = bounded_call(lambda: Executor(server), "starting the Executor")
            made.append(executor)
            return executor

        yield make
        markers.release_all()
        for executor in made:
            bounded_call(
                functools.partial(executor.shutdown, wait=True, cancel_futures=True),
                "Executor.shutdown()",
            )

    # ------------------------------------------------------------------ side channels

    @pytest.fixture
    def markers(self, tmp_path: Path) -> Iterator[Markers]:
        """Marker files written by the suite's task functions; held tasks are released after."""
        markers = Markers(tmp_path / "markers")
        yield markers
        markers.release_all()

    @pytest.fixture
    def process_table(self) -> ProcessTable:
        """A snapshot of this process's children, threads and file descriptors."""
        try:
            return ProcessTable()
        except ImportError as exc:
            pytest.fail(f"the suite needs psutil: pip install 'taskplex-core[conformance]' ({exc})")


def _unavailable(config: pytest.Config, reason: str) -> NoReturn:
    if config.getoption("taskplex_strict", False):
        pytest.fail(f"{reason} (--taskplex-strict turns this into a failure)")
    pytest.skip(reason)
