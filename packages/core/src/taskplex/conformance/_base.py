"""The fixtures every test class of the suite shares, and how the backend under test is chosen."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pytest

from taskplex import plugins
from taskplex.conformance import _support, requirements
from taskplex.conformance._support import Markers, bounded_call, serving
from taskplex.conformance.provider import Leftovers, TestProvider
from taskplex.errors import BackendUnavailable, UnknownBackend
from taskplex.executor import Executor
from taskplex.plugins import backends, capabilities_of, create_server, get_server_class
from taskplex.scheduler import TaskServer
from taskplex.server import Capabilities

EVERY_INSTALLED_BACKEND = "*"
"""The ``backend`` of the suite's own test modules: parametrised over the installed backends."""

_NO_BACKEND = "(none installed)"

MakeServer = Callable[..., TaskServer]
MakeExecutor = Callable[..., Executor]
Serve = Callable[[TaskServer], AbstractAsyncContextManager[TaskServer]]


@dataclass(frozen=True)
class BackendUnderTest:
    """The backend a test runs against, and the provider that provisions and observes it."""

    name: str
    server_class: type[TaskServer]
    provider: TestProvider

    @property
    def declared(self) -> Capabilities:
        """The capabilities the server class declares (before options are applied)."""
        return capabilities_of(self.server_class)


class SuiteBase:
    """Fixtures shared by the suite's test classes. A backend's subclass may override any of them.

    Set ``backend`` to an installed backend's name or to a server class, and ``provider`` to a
    :class:`~taskplex.conformance.provider.TestProvider` if the backend's distribution supplies
    none through the ``taskplex_test_provider`` hook. ``server_options`` gives the options the
    server is created with (by default the provider's ``options(workdir)``); the suite adds
    ``workers`` and ``queue_size``.
    """

    backend: ClassVar[str | type[TaskServer] | None] = None
    provider: ClassVar[TestProvider | None] = None
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
        if not (isinstance(server_class, type) and issubclass(server_class, TaskServer)):
            pytest.fail(
                f"backend {name!r} is {server_class!r}; the suite needs a taskplex.TaskServer subclass"
            )
        provider = cls.provider
        if provider is None and isinstance(chosen, str):
            provider = plugins.pm.hook.taskplex_test_provider(backend=chosen)
        return BackendUnderTest(name, server_class, provider or TestProvider())

    @pytest.fixture(autouse=True)
    def _scaled_bounds(self, taskplex_backend: BackendUnderTest) -> Iterator[None]:
        """Every time bound of the suite is multiplied by the provider's latency."""
        with _support.latency(taskplex_backend.provider.latency):
            yield

    @pytest.fixture(autouse=True)
    def _capability_gate(
        self,
        request: pytest.FixtureRequest,
        taskplex_backend: BackendUnderTest,
        capabilities: Capabilities,
    ) -> None:
        reason = requirements.unmet(request.node, taskplex_backend.name, capabilities)
        if reason is not None:
            pytest.skip(reason)

    @pytest.fixture
    def capabilities(
        self, taskplex_backend: BackendUnderTest, server_options: dict[str, Any]
    ) -> Capabilities:
        """What the server under test declares, built with the options the suite uses."""
        options = {**server_options, "workers": 1, "queue_size": 0}
        server = create_server(taskplex_backend.server_class, **options)
        assert isinstance(server, TaskServer)
        return server.capabilities

    @pytest.fixture
    def server_options(
        self, request: pytest.FixtureRequest, taskplex_backend: BackendUnderTest, tmp_path: Path
    ) -> dict[str, Any]:
        """Options for a server that runs here (the provider's); override to supply your own."""
        workdir = tmp_path / "backend"
        workdir.mkdir()
        try:
            return dict(taskplex_backend.provider.options(workdir))
        except BackendUnavailable as exc:
            _unavailable(request.config, f"backend {taskplex_backend.name!r} cannot run here: {exc}")

    # ------------------------------------------------------------------ servers and executors

    @pytest.fixture
    def make_server(
        self, taskplex_backend: BackendUnderTest, server_options: dict[str, Any]
    ) -> MakeServer:
        """``make_server(workers=1, queue_size=0)``: a new, not yet started server."""

        def make(workers: int = 1, queue_size: int = 0) -> TaskServer:
            options = {**server_options, "workers": workers, "queue_size": queue_size}
            server = create_server(taskplex_backend.server_class, **options)
            assert isinstance(server, TaskServer)
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
            try:
                bounded_call(
                    functools.partial(executor.shutdown, wait=True, cancel_futures=True),
                    "Executor.shutdown()",
                )
            except BaseException:
                _support.abandon(executor)  # hung: do not let it hold up the rest of the run
                raise

    # ------------------------------------------------------------------ side channels

    @pytest.fixture
    def markers(self, taskplex_backend: BackendUnderTest, tmp_path: Path) -> Iterator[Markers]:
        """Marker files written by the suite's task functions; held tasks are released after."""
        shared = taskplex_backend.provider.shared_directory(tmp_path)
        markers = Markers(shared / "markers", taskplex_backend.provider)
        yield markers
        markers.release_all()

    @pytest.fixture
    def leftovers(self, taskplex_backend: BackendUnderTest) -> Leftovers:
        """What exists now, to check what the server under test leaves behind (the provider's)."""
        try:
            return taskplex_backend.provider.snapshot()
        except ImportError as exc:
            pytest.fail(f"the suite needs psutil: pip install 'taskplex-core[conformance]' ({exc})")


def _unavailable(config: pytest.Config, reason: str) -> NoReturn:
    if config.getoption("taskplex_strict", False):
        pytest.fail(f"{reason} (--taskplex-strict turns this into a failure)")
    pytest.skip(reason)
