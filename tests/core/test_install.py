"""Discovery from a clean environment: build the wheels, install them in a fresh venv, look."""

from __future__ import annotations

import email
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "packages" / "core", ROOT / "packages" / "backend-async"]
DISTRIBUTIONS = sorted(
    path.parent
    for pattern in ("packages/*/pyproject.toml", "examples/*/pyproject.toml")
    for path in ROOT.glob(pattern)
)

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path) -> str:
    # A clean environment: nothing of this interpreter's packages may leak into the new venv.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with only the two wheels built from this tree (and their deps)."""
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    for package in PACKAGES:
        run(sys.executable, "-m", "build", "--wheel", "--outdir", wheels, package, cwd=work)
    built = sorted(wheels.glob("*.whl"))
    assert [wheel.name.split("-")[0] for wheel in built] == [
        "taskplex_backend_async",
        "taskplex_core",
    ]
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--find-links", wheels, *built, cwd=work)
    return env_dir


def test_backends_are_discovered_from_installed_wheels(clean_venv: Path) -> None:
    code = (
        "import json, taskplex\n"
        "print(json.dumps({'file': taskplex.__file__, 'backends': [\n"
        "    [b.name, b.distribution, b.version, b.capabilities.runs_coroutines]\n"
        "    for b in taskplex.backends()]}))\n"
    )
    found = json.loads(run(clean_venv / "bin" / "python", "-c", code, cwd=clean_venv))
    assert Path(found["file"]).is_relative_to(clean_venv), "imported from the new venv"
    assert ["async", "taskplex-backend-async", "0.2.0", True] in found["backends"]


def test_command_line_lists_the_installed_backend(clean_venv: Path) -> None:
    output = run(clean_venv / "bin" / "taskplex", "backends", cwd=clean_venv)
    rows = [line.split() for line in output.splitlines()]
    async_rows = [row for row in rows if row and row[0] == "async"]
    assert len(async_rows) == 1, output
    assert async_rows[0][1:3] == ["taskplex-backend-async", "0.2.0"]


def test_installed_backend_runs_a_task(clean_venv: Path) -> None:
    code = (
        "import taskplex\n"
        "with taskplex.Executor('async', workers=2) as ex:\n"
        "    print(sum(ex.map(abs, range(-3, 4))))\n"
    )
    assert run(clean_venv / "bin" / "python", "-c", code, cwd=clean_venv).strip() == "12"


@pytest.fixture(scope="module")
def every_wheel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel of every distribution in the tree, by directory name."""
    out = tmp_path_factory.mktemp("wheels")
    wheels = {}
    for package in DISTRIBUTIONS:
        target = out / package.name
        run(sys.executable, "-m", "build", "--wheel", "--outdir", target, package, cwd=out)
        [wheels[package.name]] = target.glob("*.whl")
    return wheels


def test_every_wheel_carries_the_license_and_a_readme_that_stands_alone(
    every_wheel: dict[str, Path],
) -> None:
    for name, wheel in every_wheel.items():
        with zipfile.ZipFile(wheel) as archive:
            files = archive.namelist()
            assert any(f.endswith("licenses/LICENSE") for f in files), f"{name}: no LICENSE"
            [metadata_file] = [f for f in files if f.endswith(".dist-info/METADATA")]
            metadata = email.message_from_bytes(archive.read(metadata_file))
        assert metadata["License-Expression"] == "MIT", name
        readme = metadata.get_payload()
        assert readme.strip(), f"{name}: no README as its long description"
        assert not re.search(r"\]\((\.\./|\./)", readme), f"{name}: a relative link in its README"


def test_backends_pin_a_compatible_range_of_the_core() -> None:
    core = tomllib.loads((ROOT / "packages" / "core" / "pyproject.toml").read_text())
    major, minor, _ = core["project"]["version"].split(".")
    expected = f"taskplex-core>={major}.{minor},<{major}.{int(minor) + 1}"
    for package in DISTRIBUTIONS:
        if package.name == "core":
            continue
        project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
        assert expected in project["dependencies"], f"{package.name}: {project['dependencies']}"
