"""Find the function a command line names as ``MODULE_OR_FILE:FUNCTION``.

``MODULE`` is imported the way ``python -m`` would: the current directory comes first on
``sys.path``. ``FILE`` (a path ending in ``.py`` or containing a ``/``) is imported under its own
name (``examples/sweep.py`` → module ``sweep``) with its directory first on ``sys.path``, the way
``python FILE`` sees its neighbours. In both cases the directory is also put first on
``PYTHONPATH``, so that worker processes started by this process — forked, spawned, or new
interpreters — import the function by the same name. Workers on other machines need the module
importable there themselves.

``FUNCTION`` may be a dotted path (``Model.simulate``). Every failure raises
:class:`~taskplex.cli.CommandLineError` with one line that says what was wrong.
"""

from __future__ import annotations

import difflib
import importlib
import keyword
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from taskplex.cli import CommandLineError

__all__ = ["import_callable"]


def import_callable(reference: str) -> Callable[..., Any]:
    """Import and return the callable named by ``MODULE_OR_FILE:FUNCTION``."""
    module_part, sep, attribute_path = reference.rpartition(":")
    if not sep or not module_part or not attribute_path:
        raise CommandLineError(
            f"{reference!r} is not MODULE_OR_FILE:FUNCTION; write e.g. mypackage.module:function "
            "or examples/sweep.py:simulate"
        )
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        module = _import_file(module_part)
    else:
        _put_first_on_path(os.getcwd())
        module = _import_module(module_part)
    found: Any = module
    walked = module_part
    for name in attribute_path.split("."):
        try:
            found = getattr(found, name)
        except AttributeError:
            raise CommandLineError(
                f"{walked} has no attribute {name!r}{_suggestion(found, name)}"
            ) from None
        walked = f"{walked}:{name}" if walked == module_part else f"{walked}.{name}"
    if not callable(found):
        raise CommandLineError(f"{reference} is not callable (its type is {type(found).__name__})")
    function: Callable[..., Any] = found
    return function


def _import_file(text: str) -> ModuleType:
    path = Path(text).absolute()
    if not path.is_file():
        raise CommandLineError(f"no such file: {text}")
    if path.suffix != ".py":
        raise CommandLineError(f"{text} is not a Python file: give a path that ends in .py")
    name = path.stem
    if not name.isidentifier() or keyword.iskeyword(name):
        raise CommandLineError(
            f"{text} cannot be imported as a module: {name!r} is not a valid module name "
            "(rename the file using letters, digits and underscores)"
        )
    _put_first_on_path(str(path.parent))
    module = _import_module(name)
    imported_from = getattr(module, "__file__", None)
    if imported_from is None or not path.samefile(imported_from):
        # A module of the same name (often the standard library's) wins over the file.
        raise CommandLineError(
            f"{text} cannot be imported as module {name!r}: that name is already taken by "
            f"{imported_from or 'a built-in module'}; rename the file"
        )
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
            raise CommandLineError(
                f"no module named {name!r} on sys.path or in the current directory "
                f"(for a file, give its path, e.g. {name.replace('.', '/')}.py:FUNCTION)"
            ) from None
        raise CommandLineError(f"importing {name!r} failed: {exc}") from None
    except Exception as exc:
        raise CommandLineError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from None


def _put_first_on_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)
    entries = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if directory not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([directory, *entries])


def _suggestion(namespace: object, name: str) -> str:
    candidates = [attr for attr in dir(namespace) if not attr.startswith("_")]
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
