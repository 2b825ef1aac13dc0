"""The layers of docs/architecture.md hold, and no package has an import cycle: import-linter's
contracts in pyproject.toml, run for real.

testing → interfaces → flows → tasks → (triggers | gpu_pool | sweeps) → catalog →
(publishing | sources | benchmark | stage_store) → (s3 | hf) → core: a module never imports a layer
above it, lazily inside a function included (import-linter reads every import statement).
"""

from __future__ import annotations

import tomllib

from importlinter.cli import lint_imports

from modelfactory.testing.env import REPO


def test_the_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(REPO)  # import-linter reads pyproject.toml from the working directory
    assert lint_imports(no_cache=True, no_logo=True) == 0, (
        "a module imports a layer above it, or modules of one package import each other in a cycle (see the output)")


def test_no_package_has_an_import_cycle_between_its_modules():
    """An acyclic_siblings contract over the whole tree (db -> runs -> queries -> db was one)."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert any(c["type"] == "acyclic_siblings" and c["ancestors"] == ["modelfactory"] for c in contracts)


def test_the_contract_names_every_package_of_the_tree():
    """A new subpackage must be placed in a layer, or the contract would not check it."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    contract, = (c for c in contracts if c["type"] == "layers")
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    packages = {f"modelfactory.{p.name}" for p in (REPO / "modelfactory").iterdir()
                if (p / "__init__.py").is_file()}
    assert packages - named == set()
    assert {"modelfactory.tasks", "modelfactory.flows"} <= named


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """tasks/ and flows/ stay at the repository root but install as modelfactory.tasks/.flows: a wheel
    must not put generic top-level ``tasks`` or ``flows`` packages into site-packages."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy (links kept): pip builds in the source tree and would leave build/ in the checkout.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".mf", "build", "tests", "bench", "docs", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel, = tmp_path.glob("modelfactory-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"modelfactory"}
    assert {"modelfactory/tasks/gate.py", "modelfactory/flows/factory.py"} <= set(names)


def test_modelfactory_testing_does_not_import_pytest():
    """bench/ and scripts use modelfactory.testing where pytest (a test extra) may be absent: importing
    every one of its modules in a fresh interpreter loads no pytest."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, modelfactory.testing as t\n"
            "for m in pkgutil.iter_modules(t.__path__): importlib.import_module(f'modelfactory.testing.{m.name}')\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in {'pytest', '_pytest'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_package_data_ships_every_template():
    """The server's Jinja2 templates (and the other data files) are package data, so a wheel has them."""
    from fnmatch import fnmatch

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["modelfactory"]
    root = REPO / "modelfactory"
    templates = [p.relative_to(root).as_posix() for p in (root / "interfaces" / "server" / "templates").rglob("*")
                 if p.is_file()]
    assert templates and [t for t in templates if not any(fnmatch(t, pattern) for pattern in patterns)] == []
