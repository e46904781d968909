"""Pickling calls and results for backends that run tasks in other processes or on other machines.

A call travels as two byte strings: the function, and its arguments. Each is pickled with the fast
standard :mod:`pickle` when that gives something the other side can load, and with ``cloudpickle``
otherwise: lambdas, closures, locally defined functions, and anything defined in ``__main__`` (which
a worker process does not have, or has without the definitions made under its
``if __name__ == "__main__":`` block), all of which cloudpickle sends by value.

A function that travels by reference (an importable module's function) is pickled once and cached,
so a million submits of it cost one pickle call. A function that travels by value is pickled again
at every submit (some 15 µs), so that it carries the globals and closure cells it uses as they are
at that moment, exactly as a call in this process would see them; only one that uses no globals,
closure cells or default values (``lambda x: 2 * x``) is cached. The loading side caches the
functions it rebuilt, by their bytes.

Anything that cannot be pickled raises :class:`~taskplex.errors.SerializationError` naming the
object: the function, argument ``i``, keyword argument ``k``, or the result, with its type.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
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
    return _dumps(obj, what)[0]


def _dumps(obj: Any, what: str) -> tuple[bytes, bool]:
    """The pickle of ``obj``, and whether it went by value (cloudpickle)."""
    data: bytes | None
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except BaseException as exc:  # even SystemExit from a __reduce__ fails only this pickle
        _reraise_interrupt(exc)
        data = None
    # a reference to __main__ would be looked up in the worker's own __main__ and not be found
    if data is not None and _MAIN not in data:
        return data, False
    try:
        by_value: bytes = cloudpickle.dumps(obj, PROTOCOL)
    except BaseException as exc:
        _reraise_interrupt(exc)
        if data is not None:
            return data, False
        raise SerializationError(f"cannot pickle {what}: {_describe(obj)}: {_reason(exc)}") from exc
    return by_value, True


def _reraise_interrupt(exc: BaseException) -> None:
    """Ctrl-C while pickling interrupts the caller; anything else only fails the pickle."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc


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
    """Pickle a task's function (cached where that cannot change what the worker runs)."""
    cacheable = type(function) in _CACHEABLE
    if cacheable:
        data: bytes | None = _pickled_functions.get(function)
        if data is not None:
            return data
    try:
        data, by_value = _dumps(function, f"the task's function {_name_of(function)}")
    except SerializationError as exc:
        culprit = _culprit_in_function(function)
        if culprit is None:
            raise
        label, value, reason = culprit
        raise SerializationError(
            f"cannot pickle the task's function {_name_of(function)}: its {label} holds "
            f"{_describe(value)}: {reason}"
        ) from exc
    if by_value:
        locations = _code_locations(function)
        if locations:
            data = pickle.dumps((_LOCATED, data, locations), PROTOCOL)
    if cacheable and len(data) <= _CACHE_MAX_BYTES and (not by_value or _stateless(function)):
        # by reference, or by value with nothing in it that could change before the next submit
        _pickled_functions.put(function, data)
    return data


_LOCATED = "taskplex: a function sent by value, with where its code was written"
_DYNAMIC = "<dynamic-code>"

CodeLocations = dict[tuple[str, int], str]
"""Where each code object of a function sent by value was written: (name, first line) -> file."""


def _by_value_functions(function: types.FunctionType) -> Iterator[types.FunctionType]:
    """The function and the functions it takes along by value (globals of its module, cells)."""
    seen: set[int] = set()
    todo = [function]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        namespace = current.__globals__
        for code in _codes(current.__code__):
            for name in code.co_names:
                value = namespace.get(name)
                if isinstance(value, types.FunctionType) and value.__globals__ is namespace:
                    todo.append(value)
        for cell in current.__closure__ or ():
            with contextlib.suppress(ValueError):
                if isinstance(cell.cell_contents, types.FunctionType):
                    todo.append(cell.cell_contents)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _code_locations(function: Callable[..., Any]) -> CodeLocations:
    """Where the code a by-value function takes along was written (cloudpickle drops it)."""
    if not isinstance(function, types.FunctionType):
        return {}
    return {
        (code.co_name, code.co_firstlineno): code.co_filename
        for each in _by_value_functions(function)
        for code in _codes(each.__code__)
        if not code.co_filename.startswith("<")
    }


def _relocate(function: Callable[..., Any], locations: CodeLocations) -> None:
    """Give the code of a function loaded by value its file names back, for its tracebacks."""
    if not isinstance(function, types.FunctionType):
        return

    def relocated(code: types.CodeType) -> types.CodeType:
        consts = tuple(relocated(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        filename = locations.get((code.co_name, code.co_firstlineno), code.co_filename)
        return code.replace(co_filename=filename, co_consts=consts)

    for each in list(_by_value_functions(function)):
        if each.__code__.co_filename == _DYNAMIC:
            each.__code__ = relocated(each.__code__)


def _stateless(function: Callable[..., Any]) -> bool:
    """Whether a function sent by value takes no state along: no globals, cells or defaults."""
    if not isinstance(function, types.FunctionType):
        return False
    if function.__closure__ or function.__defaults__ or function.__kwdefaults__:
        return False
    namespace = function.__globals__
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        if any(name in namespace for name in code.co_names):
            return False
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return True


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
    except BaseException as exc:
        _reraise_interrupt(exc)
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
        except BaseException as error:
            _reraise_interrupt(error)
        else:
            payload = ExceptionPayload(data, payload.type_name, payload.message, payload.traceback)
    return pickle.dumps(payload, PROTOCOL)


def loads_function(data: bytes) -> Callable[..., Any]:
    """Rebuild a function pickled by :func:`dumps_function`; cached by its bytes."""
    function: Callable[..., Any] | None = _loaded_functions.get(data)
    if function is None:
        function = pickle.loads(data)
        if type(function) is tuple and function[0] == _LOCATED:
            _, inner, locations = function
            function = pickle.loads(inner)
            _relocate(function, locations)
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
        except BaseException as exc:
            _reraise_interrupt(exc)
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
