"""Pickling calls and results for backends that run tasks in other processes or on other machines.

A call travels as two byte strings: the function, and its arguments. Each is pickled with the fast
standard :mod:`pickle` when that gives something the other side can load, and with ``cloudpickle``
otherwise: lambdas, closures, locally defined functions, and anything defined in ``__main__`` (which
a worker process does not have, or has without the definitions made under its
``if __name__ == "__main__":`` block), all of which cloudpickle sends by value.

Functions are pickled once and cached, by the function object, so a million submits of the same
function cost one cloudpickle call; a by-value function therefore carries the values of the globals
and closure cells it uses as they were when it was first submitted. The loading side caches the
functions it rebuilt, by their bytes.

Anything that cannot be pickled raises :class:`~taskplex.errors.SerializationError` naming the
object: the function, argument ``i``, keyword argument ``k``, or the result, with its type.
"""

from __future__ import annotations

import pickle
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle

from taskplex.errors import ExceptionPayload, SerializationError, capture_exception

__all__ = [
    "dumps",
    "dumps_arguments",
    "dumps_call",
    "dumps_exception",
    "dumps_function",
    "dumps_result",
    "loads",
    "loads_arguments",
    "loads_call",
    "loads_function",
]

PROTOCOL = pickle.HIGHEST_PROTOCOL
_MAIN = b"__main__"
_REPR_LENGTH = 80
_CACHE_SIZE = 256
_CACHE_MAX_BYTES = 1 << 16
"""Functions whose pickle is larger (big closures) are not kept, so the caches stay small."""

# Plain functions and builtins are immutable enough to cache by identity; partials, bound methods
# and callable objects carry state that may change between submits, so they are pickled each time.
_CACHEABLE = (types.FunctionType, types.BuiltinFunctionType)

loads = pickle.loads


def dumps(obj: Any, what: str) -> bytes:
    """Pickle ``obj`` with pickle, or cloudpickle where needed; ``what`` names it in errors."""
    data: bytes | None
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except Exception:
        data = None
    # a reference to __main__ would be looked up in the worker's own __main__ and not be found
    if data is not None and _MAIN not in data:
        return data
    try:
        by_value: bytes = cloudpickle.dumps(obj, PROTOCOL)
    except Exception as exc:
        if data is not None:
            return data
        raise SerializationError(f"cannot pickle {what}: {_describe(obj)}: {_reason(exc)}") from exc
    return by_value


class _FunctionCache:
    """A small thread-safe LRU mapping keys to values."""

    def __init__(self) -> None:
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            if len(self._items) > _CACHE_SIZE:
                self._items.popitem(last=False)


_pickled_functions = _FunctionCache()
_loaded_functions = _FunctionCache()


def dumps_function(function: Callable[..., Any]) -> bytes:
    """Pickle a task's function; the same bytes object is returned for the same function."""
    cacheable = type(function) in _CACHEABLE
    if cacheable:
        data: bytes | None = _pickled_functions.get(function)
        if data is not None:
            return data
    try:
        data = dumps(function, f"the task's function {_name_of(function)}")
    except SerializationError as exc:
        culprit = _culprit_in_function(function)
        if culprit is None:
            raise
        label, value, reason = culprit
        raise SerializationError(
            f"cannot pickle the task's function {_name_of(function)}: its {label} holds "
            f"{_describe(value)}: {reason}"
        ) from exc
    if cacheable and len(data) <= _CACHE_MAX_BYTES:
        _pickled_functions.put(function, data)
    return data


def dumps_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    """Pickle a task's arguments; on failure, name the argument that cannot be pickled."""
    try:
        return dumps((args, kwargs), "the task's arguments")
    except SerializationError:
        for index, value in enumerate(args):
            dumps(value, f"argument {index} of the task")
        for key, value in kwargs.items():
            dumps(value, f"keyword argument {key!r} of the task")
        raise  # each pickles alone: the error names the whole


def dumps_call(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[bytes, bytes]:
    """Pickle a call as (function, arguments); raise SerializationError naming the culprit."""
    return dumps_function(function), dumps_arguments(args, kwargs)


def dumps_result(value: Any) -> bytes:
    """Pickle a task's result (worker side); SerializationError names its type."""
    try:
        return pickle.dumps(value, PROTOCOL)
    except Exception:
        return dumps(value, "the task's result")


def dumps_exception(exc: BaseException) -> bytes:
    """Pickle an :class:`~taskplex.errors.ExceptionPayload` of ``exc`` (worker side).

    An exception whose class only cloudpickle can send (defined in ``__main__``, say) keeps its
    type; one that cannot be pickled at all arrives as an UnpicklableError with its message.
    """
    payload = capture_exception(exc)
    if payload.pickled is None:
        try:
            data = cloudpickle.dumps(exc, PROTOCOL)
            pickle.loads(data)
        except Exception:
            pass
        else:
            payload = ExceptionPayload(data, payload.type_name, payload.message, payload.traceback)
    return pickle.dumps(payload, PROTOCOL)


def loads_function(data: bytes) -> Callable[..., Any]:
    """Rebuild a function pickled by :func:`dumps_function`; cached by its bytes."""
    function: Callable[..., Any] | None = _loaded_functions.get(data)
    if function is None:
        function = pickle.loads(data)
        if len(data) <= _CACHE_MAX_BYTES:
            _loaded_functions.put(data, function)
    return function


def loads_arguments(data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rebuild the (args, kwargs) pickled by :func:`dumps_arguments`."""
    args, kwargs = pickle.loads(data)
    return args, kwargs


def loads_call(
    function_data: bytes, arguments_data: bytes
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Rebuild a call pickled by :func:`dumps_call`."""
    args, kwargs = loads_arguments(arguments_data)
    return loads_function(function_data), args, kwargs


def _name_of(function: Callable[..., Any]) -> str:
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module else name


def _culprit_in_function(function: Callable[..., Any]) -> tuple[str, Any, str] | None:
    """The closure variable, global or default value that keeps ``function`` from pickling."""
    if not isinstance(function, types.FunctionType):
        return None
    code = function.__code__
    candidates: list[tuple[str, Any]] = []
    for name, cell in zip(code.co_freevars, function.__closure__ or (), strict=False):
        try:
            candidates.append((f"closure variable {name!r}", cell.cell_contents))
        except ValueError:  # a cell not yet assigned
            continue
    namespace = function.__globals__
    candidates.extend(
        (f"global {name!r}", namespace[name]) for name in code.co_names if name in namespace
    )
    candidates.extend(
        (f"default argument {index}", value) for index, value in enumerate(function.__defaults__ or ())
    )
    for label, value in candidates:
        try:
            cloudpickle.dumps(value, PROTOCOL)
        except Exception as exc:
            return label, value, _reason(exc)
    return None


def _describe(obj: Any) -> str:
    kind = type(obj)
    text = repr(obj) if not isinstance(obj, types.FunctionType) else _name_of(obj)
    if len(text) > _REPR_LENGTH:
        text = text[: _REPR_LENGTH - 3] + "..."
    return f"{text} (of type {kind.__module__}.{kind.__qualname__})"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
