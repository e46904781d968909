"""Plugins: how backends and extensions are found and how to write one.

taskplex has one :class:`pluggy.PluginManager`, named ``"taskplex"``. A plugin is any module or object
with functions marked ``@taskplex.hookimpl`` whose names match the specs in
:mod:`taskplex.hookspecs`. Installed plugins are found through the ``taskplex`` entry-point group;
our own built-in plugins are registered through the same hooks.

A backend is a distribution with one entry point::

    [project.entry-points.taskplex]
    mybackend = "taskplex_mybackend.plugin"

and in that module::

    import taskplex

    @taskplex.hookimpl
    def taskplex_register_servers(register):
        register("mybackend", MyServer)

after which ``taskplex.Executor("mybackend")`` works and ``taskplex backends`` lists it. Set
``TASKPLEX_DISABLE_PLUGINS=name1,name2`` to keep entry points with those names from loading.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from taskplex import hookspecs
from taskplex.errors import InvalidOption, UnknownBackend

if TYPE_CHECKING:
    from taskplex.server import Capabilities, Server

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendInfo",
    "backends",
    "create_server",
    "get_server_class",
    "hookimpl",
    "load_plugins",
    "pm",
]

ENTRY_POINT_GROUP = "taskplex"
hookimpl = pluggy.HookimplMarker("taskplex")
pm = pluggy.PluginManager("taskplex")
pm.add_hookspecs(hookspecs)

_BUILTIN_PLUGINS = ("taskplex.cli",)
_load_lock = threading.Lock()
_loaded = threading.Event()


def load_plugins() -> None:
    """Register built-in plugins and load installed ones; does its work once per process."""
    with _load_lock:
        if _loaded.is_set():
            return
        for name in _disabled():
            pm.set_blocked(name)
        for module_name in _BUILTIN_PLUGINS:
            if not pm.is_blocked(module_name) and pm.get_plugin(module_name) is None:
                pm.register(_import(module_name), name=module_name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _loaded.set()


def _disabled() -> set[str]:
    raw = os.environ.get("TASKPLEX_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _import(module_name: str) -> Any:
    __import__(module_name)
    return sys.modules[module_name]


def _server_classes() -> dict[str, type[Server]]:
    load_plugins()
    found: dict[str, type[Server]] = {}

    def register(name: str, server_class: type[Server]) -> None:
        if name in found and found[name] is not server_class:
            raise RuntimeError(
                f"two plugins register a backend named {name!r}: "
                f"{found[name].__module__} and {server_class.__module__}"
            )
        found[name] = server_class

    pm.hook.taskplex_register_servers(register=register)
    return found


@dataclass(frozen=True)
class BackendInfo:
    """An installed backend: its name, server class, distribution and capabilities."""

    name: str
    server_class: type[Server]
    distribution: str | None
    version: str | None
    capabilities: Capabilities


def backends() -> list[BackendInfo]:
    """Every installed backend, sorted by name."""
    # The entry point names its distribution (also for editable installs, which record no package
    # files); only a class registered by a plugin without an entry point needs the slower scan.
    plugin_dists = {
        entry_point.module.partition(".")[0]: entry_point.dist.name
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if entry_point.dist is not None
    }
    infos = []
    for name, cls in sorted(_server_classes().items()):
        top = cls.__module__.partition(".")[0]
        dist = plugin_dists.get(top) or _distribution_of_package(top)
        version = importlib.metadata.version(dist) if dist else None
        infos.append(BackendInfo(name, cls, dist, version, _capabilities_of(cls)))
    return infos


def _distribution_of_package(top: str) -> str | None:
    return next(iter(importlib.metadata.packages_distributions().get(top, ())), None)


def _capabilities_of(cls: type[Server]) -> Capabilities:
    from taskplex.server import Capabilities

    caps = getattr(cls, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else Capabilities()


def get_server_class(name: str) -> type[Server]:
    """The server class registered as ``name``; UnknownBackend lists what is installed."""
    classes = _server_classes()
    try:
        return classes[name]
    except KeyError:
        installed = ", ".join(sorted(classes)) or "none"
        raise UnknownBackend(
            f"no taskplex backend named {name!r} is installed (installed: {installed}). "
            f"Backends are separate distributions: try `pip install taskplex-backend-{name}`"
            + (
                f", or check TASKPLEX_DISABLE_PLUGINS={os.environ['TASKPLEX_DISABLE_PLUGINS']!r}"
                if _disabled()
                else ""
            )
        ) from None


_NAMED = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def create_server(backend: str | type[Server], **options: Any) -> Server:
    """Create a server by backend name (or class); unknown options name the valid ones."""
    server_class = get_server_class(backend) if isinstance(backend, str) else backend
    params = inspect.signature(server_class).parameters.values()
    valid = {p.name for p in params if p.kind in _NAMED}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = sorted(set(options) - set(valid))
    if unknown and not accepts_any:
        raise InvalidOption(
            f"{server_class.__name__} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options are: {', '.join(sorted(valid))}"
        )
    return server_class(**options)
