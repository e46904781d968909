"""Task keys: what a restart journal or a result cache knows a task by.

:func:`task_key` gives, in order of precedence: the ``key`` the caller set on the task; ``name:``
and the task's name when it has one (the caller vouches that a name means one computation); else a
digest of what the call computes:

- the function: its module and qualified name, and the code of every function it takes along from
  its own module (the functions its code names there, and those in its closure, recursively),
  so that editing any of them changes the key — line numbers and file names are left out, so
  editing *elsewhere* in the file does not;
- the values it reads from its module's globals, closure cells and defaults, as they are at
  submit (a sweep over a module-level setting gets one key per setting);
- the arguments, and the Python version (bytecode is per version).

Values are encoded canonically: numbers, strings, bytes, None, tuples, lists, dicts and sets by
their content (sets and dicts in a sorted order, so hash randomisation cannot change a key);
anything else by its pickle. A value that cannot be pickled (an open file, a lock) raises
:class:`~taskplex.errors.UnstableKey`, which says which value and how to name the task instead:
the key is never silently guessed. A pickle that is not the same in every run only costs a
journal miss (the task runs again), never a wrong result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pickle
import struct
import sys
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskplex.errors import UnstableKey

if TYPE_CHECKING:
    from taskplex.task import Task

__all__ = ["KEY_VERSION", "function_digest", "task_key"]

KEY_VERSION = 1
"""Changes when the way keys are computed changes, so that old journal entries are not reused."""

_PYTHON = f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}".encode()
_MAX_DEPTH = 64
_pack_int = struct.Struct("<q").pack
_pack_float = struct.Struct("<d").pack


def task_key(task: Task) -> str:
    """The key of ``task``: its ``key``, else ``name:<name>``, else a digest of its call."""
    if task.key is not None:
        return task.key
    if task.name is not None:
        return f"name:{task.name}"
    digest = hashlib.blake2b(digest_size=20)
    digest.update(b"taskplex-key-%d\0" % KEY_VERSION)
    digest.update(_PYTHON)
    _update_callable(digest, task.function, task)  # `where`, named only in an error message
    encoder = _Encoder(digest, task)
    encoder.value(task.args, "its arguments")
    if task.kwargs:
        encoder.value(task.kwargs, "its keyword arguments")
    return f"k{KEY_VERSION}-{digest.hexdigest()}"


def function_digest(function: Callable[..., Any]) -> str:
    """A digest of ``function``'s identity and code (and the values it reads), as keys use it."""
    digest = hashlib.blake2b(digest_size=12)
    _update_callable(digest, function, f"function {_qualified(function)}")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# functions
# --------------------------------------------------------------------------------------------------


class _Shape:
    """What never changes about a function: its code, and where it reads values from."""

    __slots__ = ("code", "code_digest", "global_names")

    def __init__(self, function: types.FunctionType) -> None:
        self.code = function.__code__
        digest = hashlib.blake2b(digest_size=20)
        names: list[str] = []
        for code in _codes(function.__code__):
            digest.update(code.co_code)
            digest.update(repr((code.co_name, code.co_names, code.co_varnames)).encode())
            digest.update(repr(code.co_freevars).encode())
            for const in code.co_consts:
                if not isinstance(const, types.CodeType):
                    _Encoder(digest, "a constant").value(const, "a constant")
            names.extend(code.co_names)
        self.code_digest = digest.digest()
        self.global_names = tuple(dict.fromkeys(names))


_shapes: weakref.WeakKeyDictionary[types.FunctionType, _Shape] = weakref.WeakKeyDictionary()


def _shape(function: types.FunctionType) -> _Shape:
    shape = _shapes.get(function)
    if shape is None or shape.code is not function.__code__:
        shape = _Shape(function)
        _shapes[function] = shape
    return shape


def _codes(code: types.CodeType) -> list[types.CodeType]:
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found.extend(_codes(const))
    return found


def _update_callable(digest: Any, function: Any, where: object) -> None:
    if isinstance(function, functools.partial):
        digest.update(b"partial\0")
        _update_callable(digest, function.func, where)
        _Encoder(digest, where).value(function.args, "its partial's arguments")
        _Encoder(digest, where).value(function.keywords, "its partial's keyword arguments")
    elif isinstance(function, types.MethodType):
        digest.update(b"method\0")
        _update_callable(digest, function.__func__, where)
        _Encoder(digest, where).value(function.__self__, "the object its method is bound to")
    elif isinstance(function, types.FunctionType):
        _update_function(digest, function, where, set())
    elif isinstance(function, type | types.BuiltinFunctionType):
        digest.update(f"ref\0{_qualified(function)}\0".encode())
    else:  # a callable object: by its pickle, which names its class and holds its state
        digest.update(b"object\0")
        _Encoder(digest, where).value(function, "its function (a callable object)")


def _update_function(digest: Any, function: types.FunctionType, where: object, seen: set[int]) -> None:
    if id(function) in seen:
        digest.update(b"again\0" + _qualified(function).encode())
        return
    seen.add(id(function))
    shape = _shape(function)
    digest.update(f"function\0{_qualified(function)}\0".encode())
    digest.update(shape.code_digest)
    if function.__defaults__ is not None or function.__kwdefaults__ is not None:
        encoder = _Encoder(digest, where)
        encoder.value(function.__defaults__, f"the defaults of {function.__qualname__}")
        encoder.value(function.__kwdefaults__, f"the keyword defaults of {function.__qualname__}")
    namespace = function.__globals__
    for name in shape.global_names:
        if name not in namespace:
            continue  # a builtin, or an attribute name
        _update_reference(digest, namespace[name], namespace, where, seen, label=f"global {name!r}")
    for index, cell in enumerate(function.__closure__ or ()):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            digest.update(b"empty-cell\0")
            continue
        _update_reference(digest, contents, namespace, where, seen, label=f"closure variable {index}")


def _update_reference(
    digest: Any, value: Any, namespace: dict[str, Any], where: object, seen: set[int], *, label: str
) -> None:
    digest.update(label.encode() + b"\0")
    kind = type(value)
    if kind is int or kind is str or kind is float:  # the usual settings: no detour
        digest.update(_ENCODER.encode(value, 0))
    elif isinstance(value, types.FunctionType):
        if value.__globals__ is namespace:  # taken along by value: its code counts
            _update_function(digest, value, where, seen)
        else:
            digest.update(f"ref\0{_qualified(value)}\0".encode())
    elif isinstance(value, types.ModuleType):
        digest.update(f"module\0{value.__name__}\0".encode())
    elif isinstance(value, type) and value.__module__ == namespace.get("__name__"):
        # a class of the function's own module: its methods' code counts too
        digest.update(f"class\0{_qualified(value)}\0".encode())
        for name, member in sorted(vars(value).items()):
            digest.update(name.encode() + b"\0")
            if isinstance(member, types.FunctionType):
                _update_function(digest, member, where, seen)
            elif isinstance(member, staticmethod | classmethod) and isinstance(
                member.__func__, types.FunctionType
            ):
                _update_function(digest, member.__func__, where, seen)
    elif isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        digest.update(f"ref\0{_qualified(value)}\0".encode())
    else:
        _Encoder(digest, where).value(value, f"the value of its {label}")


def _qualified(function: Any) -> str:
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    return f"{module}.{name or type(function).__qualname__}"


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------


class _Encoder:
    """Feeds a canonical encoding of values into a digest."""

    __slots__ = ("_digest", "_where")

    def __init__(self, digest: Any, where: object) -> None:
        self._digest = digest
        self._where = where

    def value(self, value: Any, label: str) -> None:
        try:
            self._digest.update(self.encode(value, 0))
        except UnstableKey:
            raise
        except RecursionError as exc:
            raise self._unstable(label, value, "it contains itself") from exc
        except Exception as exc:
            raise self._unstable(label, value, f"{type(exc).__name__}: {exc}") from exc

    def _unstable(self, label: str, value: Any, reason: str) -> UnstableKey:
        return UnstableKey(
            f"cannot compute a journal key for {self._where}: {label} ({type(value).__qualname__}) "
            f"cannot be encoded ({reason}); give the task a name= or key= that identifies what "
            "it computes"
        )

    def encode(self, value: Any, depth: int) -> bytes:
        kind = type(value)
        if value is None or kind is bool:
            return b"c" + repr(value).encode()
        if kind is int:
            return b"i" + str(value).encode() + b";"
        if kind is float:
            return b"f" + _pack_float(value)
        if kind is str:
            text: bytes = value.encode("utf-8", "surrogatepass")
            return b"s" + _pack_int(len(text)) + text
        if kind is bytes:
            raw: bytes = value
            return b"b" + _pack_int(len(raw)) + raw
        if depth < _MAX_DEPTH:
            if kind is tuple or kind is list:
                parts = [self.encode(item, depth + 1) for item in value]
                return (b"t" if kind is tuple else b"l") + _pack_int(len(parts)) + b"".join(parts)
            if kind is dict:
                pairs = sorted(
                    self.encode(k, depth + 1) + self.encode(v, depth + 1) for k, v in value.items()
                )
                return b"d" + _pack_int(len(pairs)) + b"".join(pairs)
            if kind is set or kind is frozenset:
                items = sorted(self.encode(item, depth + 1) for item in value)
                return b"e" + _pack_int(len(items)) + b"".join(items)
        data = _pickled(value)
        return b"p" + _pack_int(len(data)) + data


_ENCODER = _Encoder(None, None)  # its `encode` only: for values that cannot fail to encode


def _pickled(value: Any) -> bytes:
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    import cloudpickle  # things only cloudpickle can pickle: classes of __main__, lambdas

    with contextlib.suppress(Exception):
        return bytes(cloudpickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    # raise the plain pickle error: it says what could not be pickled
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
