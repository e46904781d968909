"""Plugins: discovery of backends, disabling by name, conflicts, and registering from a plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskplex
from taskplex import Capabilities, Server, TaskServer, UnknownBackend
from taskplex.backend import Attempt, CoroutineBackend
from taskplex.plugins import ENTRY_POINT_GROUP, create_server, pm
from taskplex_async import AsyncServer

LIST_BACKENDS = "import json, taskplex; print(json.dumps([b.name for b in taskplex.backends()]))"


def backends_in_subprocess(**env: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", LIST_BACKENDS],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names: list[str] = json.loads(result.stdout)
    return names


def test_plugin_manager_and_entry_point_group_share_the_project_name() -> None:
    assert pm.project_name == ENTRY_POINT_GROUP == "taskplex"


def test_async_backend_is_discovered_with_its_distribution_and_capabilities() -> None:
    infos = {info.name: info for info in taskplex.backends()}
    info = infos["async"]
    assert info.server_class is AsyncServer
    assert info.distribution == "taskplex-backend-async"
    assert info.version == "0.2.0"
    assert info.capabilities == AsyncServer.backend_class.capabilities
    assert info.capabilities.runs_coroutines


def test_backends_are_sorted_by_name() -> None:
    names = [info.name for info in taskplex.backends()]
    assert names == sorted(names)


def test_disabled_plugin_is_not_loaded() -> None:
    assert "async" in backends_in_subprocess(TASKPLEX_DISABLE_PLUGINS="")
    assert "async" not in backends_in_subprocess(TASKPLEX_DISABLE_PLUGINS="nothing, async")


def test_unknown_backend_error_mentions_disabled_plugins() -> None:
    code = (
        "import taskplex\n"
        "try:\n"
        "    taskplex.Executor('async')\n"
        "except taskplex.UnknownBackend as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TASKPLEX_DISABLE_PLUGINS": "async"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "no taskplex backend named 'async'" in result.stdout
    assert "TASKPLEX_DISABLE_PLUGINS='async'" in result.stdout


class EchoBackend(CoroutineBackend):
    """A backend that returns its task's first argument without calling the function."""

    capabilities = Capabilities(resources=frozenset({"memory"}))

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    async def execute(self, attempt: Attempt) -> Any:
        return f"{self.prefix}{attempt.task.args[0]}"


class EchoServer(TaskServer):
    backend_class = EchoBackend

    def __init__(self, *, workers: int = 1, queue_size: int = 0, prefix: str = "") -> None:
        super().__init__(EchoBackend(prefix), workers=workers, queue_size=queue_size)


class EchoPlugin:
    @taskplex.hookimpl
    def taskplex_register_servers(self, register: Callable[[str, type[Server]], None]) -> None:
        register("echo", EchoServer)


class OtherEchoServer(EchoServer):
    """A second, different class registered under the same name."""


class ConflictingEchoPlugin:
    @taskplex.hookimpl
    def taskplex_register_servers(self, register: Callable[[str, type[Server]], None]) -> None:
        register("echo", OtherEchoServer)


def test_a_registered_plugin_makes_its_backend_usable(
    register_plugin: Callable[[Any], None],
) -> None:
    with pytest.raises(UnknownBackend):
        create_server("echo")
    register_plugin(EchoPlugin())
    info = {info.name: info for info in taskplex.backends()}["echo"]
    assert info.server_class is EchoServer
    assert info.capabilities.resources == frozenset({"memory"})
    with taskplex.Executor("echo", workers=2, prefix="echo: ") as executor:
        assert executor.submit(print, "hello").result(timeout=30) == "echo: hello"


def test_options_of_a_plugin_backend_are_checked(register_plugin: Callable[[Any], None]) -> None:
    register_plugin(EchoPlugin())
    with pytest.raises(taskplex.InvalidOption, match=r"'suffix'.*prefix"):
        create_server("echo", suffix="!")


def test_two_plugins_registering_one_name_is_an_error(
    register_plugin: Callable[[Any], None],
) -> None:
    register_plugin(EchoPlugin())
    register_plugin(ConflictingEchoPlugin())
    with pytest.raises(RuntimeError, match="two plugins register a backend named 'echo'"):
        taskplex.backends()


def test_registering_the_same_class_twice_is_harmless(
    register_plugin: Callable[[Any], None],
) -> None:
    register_plugin(EchoPlugin())
    register_plugin(EchoPlugin())
    assert [info.name for info in taskplex.backends()].count("echo") == 1


def test_the_register_plugin_fixture_cleaned_up_after_itself() -> None:
    assert "echo" not in [info.name for info in taskplex.backends()]


# ------------------------------------------------------------------------------ broken plugins

MISSPELT = """
import taskplex

@taskplex.hookimpl
def taskplex_registr_servers(register):
    register("misspelt", object)
"""


def install_fake_plugins(site: Path) -> None:
    """Two broken plugins as installed distributions would be: a misspelt hook, an import error."""
    (site / "misspelt_plugin.py").write_text(MISSPELT)
    (site / "crashing_plugin.py").write_text("raise ImportError('libfoo.so: cannot open')\n")
    for dist, module in (("misspelt", "misspelt_plugin"), ("crashing", "crashing_plugin")):
        info = site / f"taskplex_{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: taskplex-{dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[taskplex]\n{dist} = {module}\n")


def test_broken_plugins_are_reported_and_the_others_still_load(tmp_path: Path) -> None:
    install_fake_plugins(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    listing = subprocess.run(
        [sys.executable, "-m", "taskplex.cli", "backends"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "did you mean 'taskplex_register_servers'" in lines["misspelt"]
    assert "BROKEN" in lines["misspelt"]
    assert "libfoo.so: cannot open" in lines["crashing"]
    assert "mp" in lines, "a broken plugin must not stop the other backends from loading"
    code = (
        "import taskplex\n"
        "with taskplex.Executor('async') as ex: print(ex.submit(abs, -4).result(timeout=30))\n"
        "try:\n"
        "    taskplex.Executor('misspelt')\n"
        "except taskplex.UnknownBackend as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines()[0] == "4"
    assert "'misspelt' is installed (taskplex-misspelt) but broken" in result.stdout
    assert "misspelt" in result.stderr, "loading a broken plugin is logged, naming it"


def test_the_version_is_the_installed_distributions() -> None:
    import importlib.metadata

    assert taskplex.__version__ == importlib.metadata.version("taskplex-core")
