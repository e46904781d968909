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

import difflib
import importlib.metadata
import inspect
import logging
import os
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
    "PUBLISHED_BACKENDS",
    "BackendInfo",
    "BrokenPlugin",
    "backends",
    "broken_plugins",
    "capabilities_of",
    "create_server",
    "get_server_class",
    "hookimpl",
    "load_plugins",
    "pm",
    "register_plugin",
]

logger = logging.getLogger("taskplex.plugins")

ENTRY_POINT_GROUP = "taskplex"
hookimpl = pluggy.HookimplMarker("taskplex")
pm = pluggy.PluginManager("taskplex")
pm.add_hookspecs(hookspecs)

PUBLISHED_BACKENDS = {
    "async": "taskplex-backend-async",
    "mp": "taskplex-backend-mp",
    "mpi": "taskplex-backend-mpi",
    "hpc": "taskplex-backend-hpc",
    "zmq": "taskplex-backend-zmq",
}
"""The backends this project publishes, by name, with the distribution that provides each."""

_load_lock = threading.Lock()
_loaded = threading.Event()
_broken: dict[str, BrokenPlugin] = {}


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin that could not be loaded, and why; the others load without it."""

    name: str
    distribution: str | None
    reason: str


def load_plugins() -> None:
    """Load the installed plugins (entry points of the ``taskplex`` group); once per process.

    Each entry point is loaded on its own: one that fails to import, or whose hook implementations
    do not match taskplex's hook specs (a misspelt hook name, a wrong argument), is recorded as
    broken with the reason (see :func:`broken_plugins`), logged, and left out; the others load.
    """
    with _load_lock:
        if _loaded.is_set():
            return
        for name in _disabled():
            pm.set_blocked(name)
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(entry_point.name) or pm.has_plugin(entry_point.name):
                continue
            dist = entry_point.dist.name if entry_point.dist is not None else None
            try:
                plugin = entry_point.load()
            except Exception as exc:
                _mark_broken(
                    entry_point.name,
                    dist,
                    f"importing {entry_point.value} failed: {type(exc).__name__}: {exc}",
                )
                continue
            register_plugin(plugin, entry_point.name, dist)
        _loaded.set()


def register_plugin(plugin: Any, name: str, distribution: str | None = None) -> bool:
    """Register ``plugin`` under ``name`` after checking its hooks; False (and recorded) if broken."""
    problem = _hook_problem(plugin)
    if problem is None:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:  # pluggy's PluginValidationError: arguments that match no spec
            problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        _mark_broken(name, distribution, problem)
        return False
    return True


def broken_plugins() -> list[BrokenPlugin]:
    """The installed plugins that could not be loaded, with the reason for each."""
    load_plugins()
    return sorted(_broken.values(), key=lambda broken: broken.name)


def _mark_broken(name: str, distribution: str | None, reason: str) -> None:
    _broken[name] = BrokenPlugin(name, distribution, reason)
    logger.error(
        "the taskplex plugin %r (%s) is broken and was not loaded: %s",
        name,
        distribution or "no distribution",
        reason,
    )


def _hook_problem(plugin: Any) -> str | None:
    """What is wrong with ``plugin``'s hook implementations (a name no spec has), or None."""
    specs = {name for name in dir(pm.hook) if name.startswith("taskplex_")}
    for attribute in dir(plugin):
        marked = pm.parse_hookimpl_opts(plugin, attribute) is not None
        if not marked and not attribute.startswith("taskplex_"):
            continue
        if attribute in specs:
            continue
        if not marked and not callable(getattr(plugin, attribute, None)):
            continue
        close = difflib.get_close_matches(attribute, specs, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{attribute!r} is not a taskplex hook{hint}; the hooks are listed in taskplex.hookspecs"
    return None


def _disabled() -> set[str]:
    raw = os.environ.get("TASKPLEX_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _server_classes() -> dict[str, type[Server]]:
    load_plugins()
    found: dict[str, type[Server]] = {}

    def register(name: str, server_class: type[Server]) -> None:
        if name in found and found[name] is not server_class:
            raise _NameConflict(
                f"two plugins register a backend named {name!r}: "
                f"{found[name].__module__} and {server_class.__module__}"
            )
        found[name] = server_class

    for impl in pm.hook.taskplex_register_servers.get_hookimpls():
        try:
            impl.function(register=register)
        except _NameConflict:
            raise
        except Exception as exc:  # one broken plugin must not take the others down
            if impl.plugin_name not in _broken:
                _mark_broken(
                    impl.plugin_name,
                    None,
                    f"taskplex_register_servers raised {type(exc).__name__}: {exc}",
                )
    return found


class _NameConflict(RuntimeError):
    """Two installed plugins claim one backend name: the environment must be fixed."""


@dataclass(frozen=True)
class BackendInfo:
    """An installed backend: its name, server class, distribution and capabilities."""

    name: str
    server_class: type[Server]
    distribution: str | None
    version: str | None
    capabilities: Capabilities


def backends() -> list[BackendInfo]:
    """Every installed backend that loads, sorted by name (see also :func:`broken_plugins`)."""
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
        infos.append(BackendInfo(name, cls, dist, version, capabilities_of(cls)))
    return infos


def _distribution_of_package(top: str) -> str | None:
    return next(iter(importlib.metadata.packages_distributions().get(top, ())), None)


def capabilities_of(cls: type[Server]) -> Capabilities:
    """The capabilities a server class declares (its backend's defaults), without creating it."""
    from taskplex.server import Capabilities

    for holder in (getattr(cls, "backend_class", None), cls):
        caps = getattr(holder, "capabilities", None)
        if isinstance(caps, Capabilities):
            return caps
    return Capabilities()


def get_server_class(name: str) -> type[Server]:
    """The server class registered as ``name``; UnknownBackend says what is there instead."""
    classes = _server_classes()
    try:
        return classes[name]
    except KeyError:
        pass
    broken = _broken.get(name)
    if broken is not None:
        raise UnknownBackend(
            f"the taskplex backend {name!r} is installed ({broken.distribution or 'no distribution'}) "
            f"but broken: {broken.reason}"
        )
    installed = ", ".join(sorted(classes)) or "none"
    message = f"no taskplex backend named {name!r} is installed (installed: {installed})."
    close = difflib.get_close_matches(name, [*classes, *PUBLISHED_BACKENDS], n=1)
    if name in PUBLISHED_BACKENDS:
        message += (
            f" It is published as a separate distribution: `pip install {PUBLISHED_BACKENDS[name]}`."
        )
    elif close:
        message += f" Did you mean {close[0]!r}?"
    if name not in PUBLISHED_BACKENDS:
        available = ", ".join(f"{backend} ({dist})" for backend, dist in PUBLISHED_BACKENDS.items())
        message += f" The backends taskplex publishes: {available}."
    if _disabled():
        message += f" Check TASKPLEX_DISABLE_PLUGINS={os.environ['TASKPLEX_DISABLE_PLUGINS']!r}."
    raise UnknownBackend(message)


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
