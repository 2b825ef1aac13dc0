"""The README, the docs and the Makefile stay true to the code where a test can tell: the example specs
parse, the files they link to exist, ``make test-fast`` names real markers."""

from __future__ import annotations

import re

import pytest
import yaml

from modelfactory.core.specs import parse_spec
from modelfactory.testing.env import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("page", [REPO / "README.md", REPO / "docs" / "specs.md"], ids=lambda p: p.name)
def test_the_example_specs_parse(page):
    specs = [block for block in yaml_blocks(page.read_text()) if block.lstrip().startswith("name:")]
    assert specs, f"{page.name} shows no spec"
    for block in specs:
        parse_spec(yaml.safe_load(block), origin=page.name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(page):
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", page.read_text())
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_the_readme_names_every_command():
    """The CLI at a glance misses no command of ``modelfactory``."""
    import typer.main

    from modelfactory.interfaces.cli.main import app

    readme = (REPO / "README.md").read_text()
    commands = typer.main.get_command(app).commands
    assert [name for name in commands if f"`modelfactory {name}" not in readme] == []


def test_the_readme_stays_short():
    """The README is the front door: what it is, the two commands, a spec, the CLI, links into docs/."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_make_test_fast_deselects_only_markers_that_exist():
    """``make test-fast``'s marker expression names registered markers only (a typo would select nothing
    less, silently)."""
    import tomllib

    fast = re.search(r'^FAST := (.+)$', (REPO / "Makefile").read_text(), flags=re.MULTILINE).group(1)
    named = set(re.findall(r"not (\w+)", fast))
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert named and named <= {m.split(":")[0] for m in markers}, (named, markers)
