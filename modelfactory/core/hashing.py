"""Canonical JSON and content hashes: the basis of every step key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

#: Bump when a step's output format changes, so old outputs are not reused.
#: 2: ``_COMPLETE.json`` lists the output's files (size, sha256); quantized models are identified by content.
KEY_SCHEMA = 2
_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) of plain data or pydantic models."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__} in a step key")


def step_key(step: str, **inputs: Any) -> str:
    """A short, stable key for a step's output: sha256 of the step name and its inputs."""
    payload = canonical_json({"step": step, "schema": KEY_SCHEMA, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(root: Path) -> str:
    """Content hash of a folder: relative paths and file hashes, hidden files ignored."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        digest.update(f"{rel}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
