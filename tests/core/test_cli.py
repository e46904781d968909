"""The ``taskplex`` command line: ``backends``, ``map`` and sub-commands added by plugins.

``map`` runs in a real subprocess (``python -m taskplex.cli``, and the console script) on the async
backend, which is always installed in the test environment; the functions it calls live in a module
written to a temporary directory, so the file form ``tasks.py:FUNCTION`` is exercised throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import taskplex
from taskplex import cli

BOUND = 30.0
"""Seconds a test waits for something that should happen, so that it fails instead of hanging."""

TASKS = """
import asyncio
import threading
import time
from pathlib import Path

CONSTANT = 3


def square_after(x, delay):
    time.sleep(delay)
    return x * x


def power(a, b=2):
    return a**b


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"x={x} is bad")
    return x


def as_set(x):
    return {x}


def nap_and_mark(i, marker_dir):
    Path(marker_dir, str(i)).touch()
    time.sleep(0.2)
    return i


async def hang_and_mark(i, marker_dir):
    Path(marker_dir, str(i)).touch()
    await asyncio.sleep(3600)


started = []
release = threading.Event()


def hold_first(i):
    started.append(i)
    if i == 0:
        release.wait(60)
    return i
"""

SUMMARY = re.compile(
    r"taskplex map: (?P<interrupted>interrupted: )?(?P<succeeded>\d+) succeeded, "
    r"(?P<failed>\d+) failed, (?P<cancelled>\d+) cancelled in [\d.]+ s \([\d.]+ tasks/s\) "
    r"on (?P<backend>\S+) \(workers=(?P<workers>\d+)\)"
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory holding ``tasks.py``; subprocesses run with it as their working directory."""
    (tmp_path / "tasks.py").write_text(TASKS)
    return tmp_path


def write_jsonl(path: Path, lines: Sequence[object]) -> Path:
    """Write one line per item: strings as they are, anything else as JSON."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TASKPLEX_DISABLE_PLUGINS"}
    env.update(extra)
    return env


def taskplex_command() -> list[str]:
    return [sys.executable, "-m", "taskplex.cli"]


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("taskplex")
    assert script.exists(), f"the console script of taskplex-core is not installed at {script}"
    return [str(script)]


def run_taskplex(
    arguments: str,
    *,
    cwd: Path,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``taskplex`` with ``arguments`` split as a shell would, in ``cwd``; wait for it."""
    return subprocess.run(
        [*(command or taskplex_command()), *shlex.split(arguments)],
        cwd=cwd,
        env=env or environment(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=BOUND * 2,
        check=False,
    )


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def summary(stderr: str) -> dict[str, str]:
    found = SUMMARY.search(stderr)
    assert found, f"no summary line in stderr:\n{stderr}"
    return found.groupdict()


def single_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a usage error prints; checks it is one line with no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# taskplex map: results
# ---------------------------------------------------------------------------------------------------


def test_map_writes_records_in_input_order_even_when_tasks_finish_out_of_order(
    workdir: Path,
) -> None:
    # Later lines sleep less, so with 4 workers they finish first.
    write_jsonl(workdir / "in.jsonl", [[x, 0.05 * (8 - x)] for x in range(8)])
    result = run_taskplex(
        "map tasks.py:square_after --inputs in.jsonl --backend async --workers 4", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert records(result.stdout) == [{"index": x, "ok": True, "result": x * x} for x in range(8)]
    assert summary(result.stderr) == {
        "interrupted": None,
        "succeeded": "8",
        "failed": "0",
        "cancelled": "0",
        "backend": "async",
        "workers": "4",
    }


def test_map_passes_arrays_as_args_objects_as_kwargs_and_other_values_as_one_arg(
    workdir: Path,
) -> None:
    write_jsonl(workdir / "in.jsonl", [[2, 3], {"a": 2, "b": 5}, 7, "", {"a": 10}])
    result = run_taskplex(
        "map tasks.py:power --inputs in.jsonl --output out.jsonl --backend async", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    written = records((workdir / "out.jsonl").read_text())
    assert [r["result"] for r in written] == [8, 32, 49, 100]
    assert [r["index"] for r in written] == [0, 1, 2, 3]  # the blank line takes no index


def test_a_failing_task_becomes_an_error_record_and_the_others_still_run(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[x, 2] for x in range(5)])
    result = run_taskplex(
        "map tasks.py:fail_on --inputs in.jsonl --backend async --workers 2", cwd=workdir
    )
    assert result.returncode == 1, result.stderr
    written = records(result.stdout)
    assert [r["ok"] for r in written] == [True, True, False, True, True]
    assert [r.get("result") for r in written] == [0, 1, None, 3, 4]
    error = written[2]["error"]
    assert error["type"] == "builtins.ValueError"
    assert error["message"] == "x=2 is bad"
    assert "tasks.py" in error["traceback"]
    assert 'raise ValueError(f"x={x} is bad")' in error["traceback"]
    counts = summary(result.stderr)
    assert (counts["succeeded"], counts["failed"]) == ("4", "1")


def test_a_line_that_is_not_json_becomes_an_error_record_naming_file_and_line(
    workdir: Path,
) -> None:
    write_jsonl(workdir / "in.jsonl", [[1, 9], "", "{not json", [3, 9]])
    result = run_taskplex("map tasks.py:fail_on --inputs in.jsonl --backend async", cwd=workdir)
    assert result.returncode == 1, result.stderr
    first, bad, last = records(result.stdout)
    assert first == {"index": 0, "ok": True, "result": 1}
    assert last == {"index": 2, "ok": True, "result": 3}
    assert bad["index"] == 1
    assert bad["ok"] is False
    assert bad["error"]["type"] == "json.decoder.JSONDecodeError"
    assert bad["error"]["message"].startswith("in.jsonl:3: not valid JSON")
    assert bad["error"]["traceback"] is None


def test_a_result_json_cannot_hold_is_written_as_its_repr(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[5]])
    result = run_taskplex("map tasks.py:as_set --inputs in.jsonl --backend async", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert records(result.stdout) == [{"index": 0, "ok": True, "result": "{5}", "repr": True}]


@pytest.mark.parametrize("command", [taskplex_command, console_script], ids=["-m", "script"])
def test_map_and_backends_run_as_module_and_as_console_script(
    workdir: Path, command: Callable[[], list[str]]
) -> None:
    mapped = run_taskplex(
        "map tasks.py:power --inputs - --backend async",
        cwd=workdir,
        command=command(),
        stdin="[3]\n[4, 3]\n",
    )
    assert mapped.returncode == 0, mapped.stderr
    assert [r["result"] for r in records(mapped.stdout)] == [9, 64]
    listed = run_taskplex("backends", cwd=workdir, command=command())
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^async\s", listed.stdout, re.MULTILINE)


def test_map_imports_a_module_from_the_current_directory(workdir: Path) -> None:
    # The console script, unlike `python -m`, does not put the current directory on sys.path.
    write_jsonl(workdir / "in.jsonl", [[2]])
    result = run_taskplex(
        "map tasks:power --inputs in.jsonl --backend async", cwd=workdir, command=console_script()
    )
    assert result.returncode == 0, result.stderr
    assert records(result.stdout) == [{"index": 0, "ok": True, "result": 4}]


# ---------------------------------------------------------------------------------------------------
# taskplex map: usage errors (exit 2, one line, nothing run)
# ---------------------------------------------------------------------------------------------------


def test_an_unknown_backend_is_one_line_that_lists_the_installed_ones(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[1]])
    result = run_taskplex("map tasks.py:power --inputs in.jsonl --backend nosuchbackend", cwd=workdir)
    line = single_error_line(result)
    assert line.startswith("taskplex map: error: no taskplex backend named 'nosuchbackend'")
    assert re.search(r"installed: [^)]*\basync\b", line)
    assert "taskplex-backend-nosuchbackend" not in line, "never a guessed package name"
    assert "hpc (taskplex-backend-hpc)" in line


def test_a_missing_default_backend_is_a_clean_error_and_no_output_file_is_made(
    workdir: Path,
) -> None:
    write_jsonl(workdir / "in.jsonl", [[1]])
    result = run_taskplex(
        "map tasks.py:power --inputs in.jsonl --output out.jsonl",
        cwd=workdir,
        env=environment(TASKPLEX_DISABLE_PLUGINS=cli.DEFAULT_BACKEND),
    )
    line = single_error_line(result)
    assert f"no taskplex backend named {cli.DEFAULT_BACKEND!r}" in line
    assert "TASKPLEX_DISABLE_PLUGINS" in line
    assert not (workdir / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("tasks.py", "is not MODULE_OR_FILE:FUNCTION"),
        ("tasks.py:", "is not MODULE_OR_FILE:FUNCTION"),
        ("missing.py:f", "no such file: missing.py"),
        ("no_such_module_here:f", "no module named 'no_such_module_here'"),
        ("tasks.py:powr", "tasks.py has no attribute 'powr'; did you mean 'power'?"),
        ("tasks.py:CONSTANT", "tasks.py:CONSTANT is not callable (its type is int)"),
        ("bad-name.py:f", "'bad-name' is not a valid module name"),
        ("os.py:f", "already taken by"),
        ("broken.py:f", "importing 'broken' failed: ZeroDivisionError"),
    ],
)
def test_a_bad_function_reference_is_a_one_line_error(
    workdir: Path, reference: str, expected: str
) -> None:
    (workdir / "bad-name.py").write_text("def f():\n    pass\n")
    (workdir / "os.py").write_text("def f():\n    pass\n")
    (workdir / "broken.py").write_text("1 / 0\n")
    write_jsonl(workdir / "in.jsonl", [[1]])
    result = run_taskplex(f"map {reference} --inputs in.jsonl --backend async", cwd=workdir)
    line = single_error_line(result)
    assert line.startswith("taskplex map: error: ")
    assert expected in line


def test_a_missing_inputs_file_is_a_one_line_error(workdir: Path) -> None:
    result = run_taskplex("map tasks.py:power --inputs absent.jsonl --backend async", cwd=workdir)
    assert "cannot read --inputs absent.jsonl" in single_error_line(result)


# ---------------------------------------------------------------------------------------------------
# taskplex map: backend options
# ---------------------------------------------------------------------------------------------------


def test_option_values_are_read_as_json_when_they_parse(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[1], [2]])
    result = run_taskplex(
        "map tasks.py:power --inputs in.jsonl --backend async --option workers=3 --option queue_size=0",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr)["workers"] == "3"  # an int: the string "3" would be refused


def test_an_option_value_that_is_not_json_stays_a_string(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[1]])
    result = run_taskplex(
        "map tasks.py:power --inputs in.jsonl --backend async --option workers=three", cwd=workdir
    )
    assert "workers must be an int >= 1, got 'three'" in single_error_line(result)


def test_an_unknown_option_names_the_valid_ones(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[1]])
    result = run_taskplex(
        "map tasks.py:power --inputs in.jsonl --backend async --option colour=blue", cwd=workdir
    )
    line = single_error_line(result)
    assert "'colour'" in line
    assert "valid options are: queue_size, workers" in line


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ("--option workers", "expected KEY=VALUE"),
        ("--option =4", "expected KEY=VALUE"),
        ("--workers 0", "expected a whole number >= 1"),
        ("--workers 2 --option workers=3", "disagree"),
    ],
)
def test_malformed_options_are_usage_errors(workdir: Path, arguments: str, expected: str) -> None:
    write_jsonl(workdir / "in.jsonl", [[1]])
    result = run_taskplex(
        f"map tasks.py:power --inputs in.jsonl --backend async {arguments}", cwd=workdir
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# taskplex map: streaming and Ctrl-C
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what an in-process ``taskplex map`` does to sys.path, PYTHONPATH and sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    try:
        yield
    finally:
        sys.modules.pop("tasks", None)


@pytest.mark.usefixtures("isolated_imports")
def test_map_reads_no_further_ahead_than_its_window(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskplex import _jsonl_map

    monkeypatch.setattr(_jsonl_map, "_MIN_WINDOW", 8)
    inputs = write_jsonl(workdir / "in.jsonl", [[i] for i in range(100)])
    output = workdir / "out.jsonl"
    sys.path.insert(0, str(workdir))
    import tasks  # type: ignore[import-not-found]

    seen_while_held: list[int] = []

    def release_when_the_window_is_full() -> None:
        deadline = time.monotonic() + BOUND
        while len(tasks.started) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for the loop to read too far, if it would
        seen_while_held.extend(tasks.started)
        tasks.release.set()

    releaser = threading.Thread(target=release_when_the_window_is_full)
    releaser.start()
    arguments = f"map {workdir / 'tasks.py'}:hold_first --inputs {inputs} --output {output}"
    try:
        status = cli.main([*shlex.split(arguments), "--backend", "async", "--workers", "2"])
    finally:
        tasks.release.set()
        releaser.join()
    assert status == 0, capsys.readouterr().err
    # Task 0 held its record back: 8 tasks (0..7) were in flight and reading stopped there.
    assert sorted(seen_while_held) == list(range(8))
    assert [r["result"] for r in records(output.read_text())] == list(range(100))


class OutputWatcher:
    """Collects a subprocess's stdout and stderr lines in threads, so tests can wait for one."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._collect, args=(process.stdout, self.stdout)),
            threading.Thread(target=self._collect, args=(process.stderr, self.stderr)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _collect(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + BOUND
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(BOUND)


def start_map(workdir: Path, function: str, count: int) -> subprocess.Popen[str]:
    markers = workdir / "started"
    markers.mkdir()
    inputs = write_jsonl(workdir / "in.jsonl", [[i, str(markers)] for i in range(count)])
    arguments = f"map tasks.py:{function} --inputs {inputs} --backend async --workers 2"
    return subprocess.Popen(
        [*taskplex_command(), *shlex.split(arguments)],
        cwd=workdir,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_cancels_queued_tasks_writes_what_finished_and_exits_130(workdir: Path) -> None:
    process = start_map(workdir, "nap_and_mark", 200)
    watcher = OutputWatcher(process)
    try:
        watcher.wait_for("the first result line", lambda: bool(watcher.stdout))
        process.send_signal(signal.SIGINT)
        returncode = process.wait(BOUND)
    finally:
        process.kill()
        watcher.join()
    stderr = "".join(watcher.stderr)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    counts = summary(stderr)
    assert counts["interrupted"]
    written = records("".join(watcher.stdout))
    assert [r["index"] for r in written] == list(range(len(written)))
    assert all(r["ok"] for r in written)
    assert int(counts["succeeded"]) == len(written)
    assert int(counts["cancelled"]) > 0
    # Side channel: every task that started was written, so queued tasks never started.
    assert len(list((workdir / "started").iterdir())) == len(written) < 200


def test_a_second_ctrl_c_cancels_running_tasks(workdir: Path) -> None:
    # The coroutines would sleep an hour; only cancelling them lets the run end.
    process = start_map(workdir, "hang_and_mark", 10)
    watcher = OutputWatcher(process)
    try:
        watcher.wait_for("two tasks to start", lambda: len(list(workdir.glob("started/*"))) == 2)
        process.send_signal(signal.SIGINT)
        watcher.wait_for(
            "the interrupt notice", lambda: any("interrupted" in line for line in watcher.stderr)
        )
        process.send_signal(signal.SIGINT)
        returncode = process.wait(BOUND)
    finally:
        process.kill()
        watcher.join()
    stderr = "".join(watcher.stderr)
    assert returncode == 130, stderr
    counts = summary(stderr)
    assert (counts["succeeded"], counts["failed"], counts["cancelled"]) == ("0", "0", "10")
    assert watcher.stdout == []


# ---------------------------------------------------------------------------------------------------
# taskplex backends
# ---------------------------------------------------------------------------------------------------


def test_backends_prints_an_aligned_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "DISTRIBUTION", "VERSION", "CAPABILITIES"]
    starts = [header.index(column) for column in ("DISTRIBUTION", "VERSION", "CAPABILITIES")]
    for row in rows:  # every cell starts under its heading
        assert all(row[start - 1] == " " != row[start] for start in starts), row
    async_row = next(row for row in rows if row.startswith("async "))
    assert "runs_coroutines" in async_row
    assert len(rows) == len(taskplex.backends())


def test_backends_json_lists_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    entry = listed["async"]
    assert entry["server_class"] == "taskplex_async.server.AsyncServer"
    assert entry["capabilities"]["runs_coroutines"] is True
    assert entry["capabilities"]["cancel_running"] is False
    assert set(listed) == {info.name for info in taskplex.backends()}


# ---------------------------------------------------------------------------------------------------
# sub-commands from plugins
# ---------------------------------------------------------------------------------------------------


class GreetPlugin:
    """A plugin that adds ``taskplex greet NAME`` (and ``greet --refuse`` as a usage error)."""

    @taskplex.hookimpl
    def taskplex_add_commands(self, subparsers: argparse._SubParsersAction[Any]) -> None:
        parser = subparsers.add_parser("greet", help="say hello from a plugin")
        parser.add_argument("name")
        parser.add_argument("--refuse", action="store_true")
        parser.set_defaults(handler=self.greet)

    @staticmethod
    def greet(args: argparse.Namespace) -> int:
        if args.refuse:
            raise cli.CommandLineError(f"refusing to greet {args.name}")
        print(f"hello {args.name}")
        return 7


def test_a_plugin_adds_a_sub_command(
    register_plugin: Callable[[Any], None], capsys: pytest.CaptureFixture[str]
) -> None:
    register_plugin(GreetPlugin())
    assert cli.main(["greet", "world"]) == 7
    assert capsys.readouterr().out == "hello world\n"
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    listing = capsys.readouterr().out
    assert "greet" in listing
    assert "backends" in listing
    assert "map" in listing


def test_a_plugin_command_usage_error_is_one_line_and_exit_2(
    register_plugin: Callable[[Any], None], capsys: pytest.CaptureFixture[str]
) -> None:
    register_plugin(GreetPlugin())
    assert cli.main(["greet", "world", "--refuse"]) == 2
    assert capsys.readouterr().err == "taskplex greet: error: refusing to greet world\n"


def test_without_the_plugin_its_command_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["greet", "world"])
    assert exited.value.code == 2
    assert "invalid choice: 'greet'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# taskplex map: progress
# ---------------------------------------------------------------------------------------------------


def run_with_stderr_on_a_terminal(arguments: str, *, cwd: Path) -> tuple[int, str]:
    """Run ``taskplex`` with standard error on a pseudo-terminal; its exit code and what it drew."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    # 24 rows, 100 columns: a new pseudo-terminal has a size of 0 x 0, which no real one has
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        process = subprocess.Popen(
            [*taskplex_command(), *shlex.split(arguments)],
            cwd=cwd,
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        drawn = bytearray()
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        code = process.wait(timeout=BOUND)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return code, drawn.decode(errors="replace")


def test_map_draws_a_progress_bar_on_a_terminal_and_none_into_a_pipe(workdir: Path) -> None:
    write_jsonl(workdir / "in.jsonl", [[x] for x in range(7)])
    arguments = "map tasks.py:power --inputs in.jsonl --output out.jsonl --backend async"
    code, drawn = run_with_stderr_on_a_terminal(arguments, cwd=workdir)
    assert code == 0, drawn
    assert "7/7" in drawn, f"no finished progress bar on the terminal:\n{drawn}"
    assert "100%" in drawn

    piped = run_taskplex(arguments, cwd=workdir)
    assert piped.returncode == 0, piped.stderr
    assert "7/7" not in piped.stderr, f"a progress bar was drawn into a pipe:\n{piped.stderr}"
    assert "\r" not in piped.stderr
