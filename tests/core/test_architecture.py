"""The shape of the code: the boundary between core and backends, and core's own imports.

Backends say only how work is executed: they use core's public names and the Backend contract,
never core's private state, and core never reads theirs. Checked on the source of every backend
in the repository, as a reviewer would, so that a change that crosses the line fails here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import taskplex
import taskplex.backend
from taskplex.backend import Backend

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "packages" / "core" / "src" / "taskplex"
BACKEND_SOURCES = sorted(
    path
    for pattern in ("packages/backend-*/src/*", "examples/backend-*/src/*")
    for path in ROOT.glob(pattern)
    if path.is_dir() and (path / "__init__.py").exists()
)
EXTENSION_POINTS = {"Backend", "CoroutineBackend", "TaskServer"}
"""The core classes a backend may subclass."""


def python_files(directory: Path) -> Iterator[Path]:
    yield from sorted(directory.rglob("*.py"))


def private_names_of_core() -> set[str]:
    """Every ``_name`` core assigns on an object or lists in ``__slots__``."""
    names: set[str] = set()
    for path in python_files(CORE):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "__slots__" for target in node.targets
            ):
                names.update(
                    element.value
                    for element in ast.walk(node.value)
                    if isinstance(element, ast.Constant) and isinstance(element.value, str)
                )
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def own_private_names(package: Path) -> set[str]:
    """The ``_name`` attributes a backend package defines itself (on its own objects)."""
    names: set[str] = set()
    for path in python_files(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # names in __slots__
    return names


def test_there_are_backends_to_check() -> None:
    assert {path.name for path in BACKEND_SOURCES} >= {"taskplex_async", "taskplex_mp"}


def private_imports(package: Path) -> list[str]:
    problems = []
    for path in python_files(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taskplex."):
                module = node.module or ""
                if any(part.startswith("_") for part in module.split(".")):
                    problems.append(f"{path.name}:{node.lineno} imports private module {module}")
                problems.extend(
                    f"{path.name}:{node.lineno} imports private name {alias.name} from {module}"
                    for alias in node.names
                    if alias.name.startswith("_")
                )
            elif isinstance(node, ast.Import):
                problems.extend(
                    f"{path.name}:{node.lineno} imports private module {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("taskplex.")
                    and any(part.startswith("_") for part in alias.name.split("."))
                )
    return problems


def private_state_touched(package: Path) -> list[str]:
    core_private = private_names_of_core() - own_private_names(package)
    problems = []
    for path in python_files(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or node.attr not in core_private:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            problems.append(f"{path.name}:{node.lineno} touches {ast.unparse(node)}")
    return problems


def core_classes_extended(package: Path) -> list[str]:
    public_core = set(taskplex.__all__) | set(taskplex.backend.__all__)
    problems = []
    for path in python_files(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(base).rpartition(".")[2] for base in node.bases}
            from_core = (bases & public_core) - EXTENSION_POINTS
            if from_core:
                problems.append(f"{path.name}: {node.name} subclasses {sorted(from_core)}")
            if "TaskServer" in bases:
                methods = {
                    item.name
                    for item in node.body
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                }
                if methods - {"__init__"}:
                    problems.append(
                        f"{path.name}: {node.name} overrides {sorted(methods - {'__init__'})} of "
                        "TaskServer; a server class only names its backend and options"
                    )
    return problems


@pytest.mark.parametrize("package", BACKEND_SOURCES, ids=lambda path: path.name)
def test_a_backend_keeps_to_core_public_surface(package: Path) -> None:
    assert private_imports(package) == [], "a backend imports core's private modules or names"
    assert private_state_touched(package) == [], "a backend reads or writes core's private state"
    assert core_classes_extended(package) == [], "a backend extends core beyond its extension points"


BAD_BACKEND = """
from taskplex import Task, TaskServer
from taskplex.scheduler import _shielded
from taskplex.backend import Backend


class Sneaky(Backend):
    def launch(self, attempts):
        for attempt in attempts:
            attempt._state = 1
            attempt.task._attempt = None


class OverridingServer(TaskServer):
    def __init__(self):
        super().__init__(Sneaky())

    def _pump(self):
        pass


class PatchedTask(Task):
    pass
"""


def test_the_boundary_checks_catch_a_backend_that_crosses_it(tmp_path: Path) -> None:
    package = tmp_path / "taskplex_sneaky"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(BAD_BACKEND)
    assert private_imports(package) == [
        "server.py:3 imports private name _shielded from taskplex.scheduler"
    ]
    assert private_state_touched(package) == [
        "server.py:10 touches attempt._state",
        "server.py:11 touches attempt.task._attempt",
    ]
    problems = core_classes_extended(package)
    assert any("OverridingServer overrides ['_pump']" in problem for problem in problems)
    assert any("PatchedTask subclasses ['Task']" in problem for problem in problems)


def test_core_reads_a_backend_only_through_the_backend_contract() -> None:
    contract = {name for name in dir(Backend) if not name.startswith("_")}
    problems = []
    for path in python_files(CORE):
        if path.parent.name == "conformance":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute | ast.Name)
                and ast.unparse(node.value) in ("self.backend", "backend", "self._backend")
                and node.attr not in contract
            ):
                problems.append(f"{path.name}:{node.lineno} reads {ast.unparse(node)}")
    assert problems == []


# ------------------------------------------------------------------------------ core's imports


def module_imports(path: Path) -> set[str]:
    """The taskplex modules a module imports when it is imported (not under TYPE_CHECKING,
    not inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and any(
            guard in ast.unparse(node.test) for guard in ("TYPE_CHECKING", "__main__")
        ):
            continue
        for child in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("taskplex"):
                found.add(child.module or "")
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names if alias.name.startswith("taskplex"))
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_core_has_no_import_cycle() -> None:
    graph = {module_name(path): module_imports(path) for path in python_files(CORE)}
    # importing a package imports its __init__: an edge to "taskplex" is an edge to what it imports
    for edges in graph.values():
        edges.discard("taskplex")

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, trail = stack.pop()
            for target in graph.get(module, ()):
                if target == start:
                    return [*trail, target]
                if target not in trail and target in graph:
                    stack.append((target, [*trail, target]))
        return None

    cycles = [cycle for module in graph if (cycle := cycle_from(module)) is not None]
    assert cycles == [], f"import cycles in core: {cycles[:3]}"


def test_running_a_server_does_not_import_the_command_line() -> None:
    code = (
        "import sys, taskplex\n"
        "with taskplex.Executor('async', workers=2) as ex:\n"
        "    assert ex.submit(abs, -1).result(timeout=30) == 1\n"
        "print(sorted(m for m in sys.modules if m.startswith('taskplex')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "taskplex.cli" not in result.stdout
    assert "taskplex._jsonl_map" not in result.stdout
