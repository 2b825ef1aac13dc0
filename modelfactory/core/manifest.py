"""Artifact manifests: what files an artifact has (size, sha256) plus its spec and metrics.

A reader that sees ``manifest.json`` sees a complete artifact: publishers write it last.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from modelfactory.core.errors import PublishError
from modelfactory.core.hashing import file_sha256

MANIFEST = "manifest.json"
SCHEMA = 1
#: Files of a step folder that are bookkeeping, not part of the artifact.
EXCLUDED = {"_COMPLETE.json", MANIFEST}


def artifact_files(folder: Path) -> list[Path]:
    """The files of an artifact folder; a symlink leading outside the folder is refused."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in EXCLUDED)
    root = folder.resolve()
    for path in files:
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise PublishError(
                f"{path} is a symlink to {path.resolve()}, outside the artifact folder {folder}: refusing to "
                f"publish it; artifacts may only hold their own files"
            )
    return files


def build_manifest(folder: Path, **extra: Any) -> dict[str, Any]:
    files = [
        {"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in artifact_files(folder)
    ]
    return {"schema": SCHEMA, "files": files, "total_bytes": sum(f["size"] for f in files), **extra}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def manifest_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_folder(folder: Path) -> dict[str, Any]:
    """Check every file listed in *folder*'s manifest; return the manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        raise PublishError(f"{folder} has no {MANIFEST}: the artifact is incomplete, publish it again")
    manifest = json.loads(path.read_text())
    for entry in manifest["files"]:
        file = folder / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["size"] or file_sha256(file) != entry["sha256"]:
            raise PublishError(f"{file} does not match the manifest (missing or changed): publish the artifact again")
    return manifest
