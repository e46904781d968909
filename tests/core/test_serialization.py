"""taskplex.serialization: what goes by pickle, what by cloudpickle, and errors that name the culprit."""

from __future__ import annotations

import functools
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from taskplex import SerializationError, UnpicklableError
from taskplex.errors import restore_exception
from taskplex.serialization import (
    dumps_arguments,
    dumps_call,
    dumps_exception,
    dumps_function,
    dumps_result,
    loads,
    loads_call,
)


def double(value: int) -> int:
    return 2 * value


def test_importable_functions_travel_by_reference_and_are_cached() -> None:
    data = dumps_function(double)
    assert data == pickle.dumps(double, pickle.HIGHEST_PROTOCOL)
    assert dumps_function(double) is data, "the pickle of a function should be reused"


def test_calls_round_trip() -> None:
    offset = 5
    function_data, arguments_data = dumps_call(lambda x, y=0: x + y + offset, (1,), {"y": 2})
    function, args, kwargs = loads_call(function_data, arguments_data)
    assert function(*args, **kwargs) == 8
    function_data, arguments_data = dumps_call(functools.partial(double, 4), (), {})
    function, args, kwargs = loads_call(function_data, arguments_data)
    assert function(*args, **kwargs) == 8


def test_main_module_objects_travel_by_value(tmp_path: Path) -> None:
    """What a script defines exists only in the script's process; it must travel by value."""
    script = tmp_path / "main_module.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from taskplex.serialization import dumps_call

            class Box:
                def __init__(self, value):
                    self.value = value

            def unbox(box):
                return box.value

            function_data, arguments_data = dumps_call(unbox, (Box(7),), {})
            sys.stdout.buffer.write(function_data + b"\\0SPLIT\\0" + arguments_data)
            """
        )
    )
    produced = subprocess.run([sys.executable, str(script)], capture_output=True, check=True)
    function_data, arguments_data = produced.stdout.split(b"\0SPLIT\0")
    function, args, kwargs = loads_call(function_data, arguments_data)
    assert function(*args, **kwargs) == 7


def test_unpicklable_argument_is_named() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError, match=r"argument 2 of the task: .*\(of type _thread\.lock\)"):
        dumps_arguments((1, "two", lock), {})
    with pytest.raises(SerializationError, match=r"keyword argument 'lock'"):
        dumps_arguments((), {"fine": 1, "lock": lock})


def test_unpicklable_function_names_what_it_holds() -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(SerializationError, match=r"uses_lock: its closure variable 'lock' holds"):
        dumps_function(uses_lock)
    with pytest.raises(SerializationError, match=r"the task's function .*partial"):
        dumps_function(functools.partial(uses_lock))


def test_unpicklable_result_is_named_by_type() -> None:
    with pytest.raises(SerializationError, match=r"the task's result: .*_thread\.lock"):
        dumps_result(threading.Lock())
    assert loads(dumps_result([1, "x"])) == [1, "x"]


class HoldsLock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def test_exceptions_keep_their_type_or_degrade_to_their_message() -> None:
    try:
        raise KeyError("missing")
    except KeyError as exc:
        restored = restore_exception(loads(dumps_exception(exc)))
    assert type(restored) is KeyError
    assert "missing" in str(restored)
    assert "KeyError" in str(restored.__cause__)
    try:
        raise HoldsLock("cannot travel")
    except HoldsLock as exc:
        restored = restore_exception(loads(dumps_exception(exc)))
    assert isinstance(restored, UnpicklableError)
    assert restored.message == "cannot travel"
