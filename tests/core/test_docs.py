"""The documentation cannot drift from the code: every hook and every backend here is documented."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from taskplex import plugins

ROOT = Path(__file__).resolve().parents[2]
HOOKS_PAGE = ROOT / "docs" / "hooks.md"
BACKENDS_PAGE = ROOT / "docs" / "backends.md"

HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.MULTILINE)


def hook_arguments() -> dict[str, tuple[str, ...]]:
    """Every hook spec of the plugin manager and its argument names, in order."""
    return {
        name: caller.spec.argnames
        for name, caller in vars(plugins.pm.hook).items()
        if name.startswith("taskplex_") and caller.spec is not None
    }


def sections(markdown: str) -> dict[str, str]:
    """Each heading of a Markdown page mapped to the text below it, up to the next heading."""
    matches = list(HEADING.finditer(markdown))
    return {
        match.group(1): markdown[match.end() : nxt.start() if nxt else len(markdown)]
        for match, nxt in zip(matches, [*matches[1:], None], strict=True)
    }


def repo_backends() -> list[tuple[str, str]]:
    """(entry-point name, distribution) of every backend and example backend in this repository."""
    found = []
    for pyproject in sorted(ROOT.glob("*/backend-*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for name in project.get("entry-points", {}).get("taskplex", {}):
            found.append((name, project["name"]))
    return found


def test_the_plugin_manager_has_hooks() -> None:
    # Guards the parametrisations below against silently running over nothing.
    assert "taskplex_register_servers" in hook_arguments()


def test_the_repository_has_backends() -> None:
    assert ("async", "taskplex-backend-async") in repo_backends()


@pytest.mark.parametrize(("hook", "argnames"), sorted(hook_arguments().items()))
def test_every_hook_is_documented_with_its_arguments(hook: str, argnames: tuple[str, ...]) -> None:
    page = sections(HOOKS_PAGE.read_text())
    headed = [body for heading, body in page.items() if hook in heading]
    assert headed, f"docs/hooks.md has no heading naming {hook}"
    signature = f"{hook}({', '.join(argnames)})"
    assert any(signature in body for body in headed), (
        f"the section of {hook} in docs/hooks.md does not show its signature {signature}"
    )


def test_the_hook_reference_names_only_real_hooks() -> None:
    documented = {
        name
        for heading in sections(HOOKS_PAGE.read_text())
        for name in re.findall(r"taskplex_\w+", heading)
    }
    unknown = documented - set(hook_arguments())
    assert not unknown, f"docs/hooks.md documents hooks that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize(("backend", "distribution"), repo_backends())
def test_every_backend_is_on_the_backends_page(backend: str, distribution: str) -> None:
    text = BACKENDS_PAGE.read_text()
    assert f"`{backend}`" in text, f"docs/backends.md does not name the backend `{backend}`"
    assert distribution in text, f"docs/backends.md does not name the distribution {distribution}"
