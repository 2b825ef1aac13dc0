"""The layers of docs/architecture.md hold: import-linter's contract in pyproject.toml, run for real.

testing → interfaces → flows → tasks → (triggers | gpu_pool | sweeps) → catalog →
(publishing | sources | benchmark | stage_store) → (s3 | hf) → core: a module never imports a layer
above it, lazily inside a function included (import-linter reads every import statement).
"""

from __future__ import annotations

import tomllib

from importlinter.cli import lint_imports

from modelfactory.testing.env import REPO


def test_the_layer_contract_is_kept(monkeypatch):
    monkeypatch.chdir(REPO)  # import-linter reads pyproject.toml from the working directory
    assert lint_imports(no_cache=True, no_logo=True) == 0, "a module imports a layer above it (see the output)"


def test_the_contract_names_every_package_of_the_tree():
    """A new subpackage must be placed in a layer, or the contract would not check it."""
    contract, = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    packages = {f"modelfactory.{p.name}" for p in (REPO / "modelfactory").iterdir()
                if (p / "__init__.py").is_file()}
    assert packages - named == set()
    assert {"tasks", "flows"} <= named
