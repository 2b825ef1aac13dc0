"""The worker image's pins come from pyproject.toml, and nowhere else (used by the Dockerfile).

    python infra/docker/pins.py requirements [--extra NAME]   # pyproject's dependencies, one a line
    python infra/docker/pins.py constraints                   # torch==<the base image's torch>
    python infra/docker/pins.py check                         # every dependency installed, inside its pin

``constraints`` keeps the base image's CUDA build of torch: pip may not swap it for another torch
from the index, and the image fails to build when that torch is outside pyproject's pin (pick a
base image tag inside it). ``check`` runs after the install, so an image never carries versions
other than pyproject's. Standard library + ``packaging`` only (pip's vendored copy where the image lacks it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ModuleNotFoundError:  # a bare base image: pip's vendored copy is the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def project(pyproject: Path = PYPROJECT) -> dict:
    return tomllib.loads(pyproject.read_text())["project"]


def requirements(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ()) -> list[str]:
    """pyproject's dependencies (and those of *extras*), exactly as written there."""
    meta = project(pyproject)
    optional = meta.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"pins.py: no optional dependency group {unknown} in {pyproject} "
                         f"(groups: {', '.join(optional) or 'none'})")
    return [*meta["dependencies"], *(r for e in extras for r in optional[e])]


def torch_constraint(pyproject: Path = PYPROJECT) -> str:
    """``torch==<installed>``, after checking the installed torch is inside pyproject's pin."""
    (pin,) = [Requirement(r) for r in requirements(pyproject) if Requirement(r).name == "torch"]
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemExit("pins.py: the base image has no torch: use a CUDA PyTorch image "
                         "(BASE_IMAGE, e.g. pytorch/pytorch:<torch>-cuda<cuda>-cudnn9-devel)") from exc
    if not pin.specifier.contains(installed, prereleases=True):
        raise SystemExit(f"pins.py: the base image's torch {installed} is outside pyproject's pin "
                         f"'{pin}': pick a base image (build arg TORCH_VERSION / BASE_IMAGE) inside it")
    return f"torch=={installed}"


def mismatches(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ()) -> list[str]:
    """Dependencies missing or outside their pin in this Python, and a Python outside requires-python."""
    problems = []
    python = ".".join(map(str, sys.version_info[:3]))
    requires_python = project(pyproject).get("requires-python", "")
    if not SpecifierSet(requires_python).contains(python):
        problems.append(f"Python {python} is outside requires-python '{requires_python}'")
    for line in requirements(pyproject, extras):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (pyproject: '{line}')")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is installed, pyproject pins '{line}'")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pins.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("requirements", "constraints", "check"))
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--extra", action="append", default=[], help="also an optional dependency group")
    args = parser.parse_args(argv)
    extras = tuple(args.extra)
    if args.command == "requirements":
        print("\n".join(requirements(args.pyproject, extras)))
    elif args.command == "constraints":
        print(torch_constraint(args.pyproject))
    else:
        problems = mismatches(args.pyproject, extras)
        for problem in problems:
            print(f"pins.py: {problem}", file=sys.stderr)
        if problems:
            print(f"pins.py: {len(problems)} package(s) differ from {args.pyproject}: fix the install "
                  "(the image must carry pyproject's pins)", file=sys.stderr)
            return 1
        print(f"pins.py: every dependency of {args.pyproject} is installed inside its pin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
