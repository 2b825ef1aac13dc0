"""Manifests: what files a folder has (size, sha256), written last so their presence means "complete".

- ``manifest.json``: a published artifact's manifest (its files plus spec and metrics; publishers
  write it last).
- A step output's completion marker ``_COMPLETE.json`` (:mod:`modelfactory.core.workdir`) lists its
  files the same way (:func:`file_entries`).

:func:`content_digest` is the identity of a folder's *content*: the sha256 of its files' paths,
sizes and sha256s. Two folders with the same bytes have the same digest whatever else their
manifests say (creation time, metrics), so it keys published artifacts and proves that what was
published is what was benchmarked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def file_entries(folder: Path, files: Iterable[Path]) -> list[dict[str, Any]]:
    """``{"path", "size", "sha256"}`` of each of *files* (under *folder*), hashed in parallel."""
    files = list(files)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, files))
    return [{"path": f.relative_to(folder).as_posix(), "size": f.stat().st_size, "sha256": d}
            for f, d in zip(files, digests, strict=True)]


def content_digest(files: Sequence[Mapping[str, Any]]) -> str:
    """The sha256 of a folder's content from its manifest entries: paths, sizes and file hashes only."""
    lines = sorted(f"{f['path']}\0{int(f['size'])}\0{f['sha256']}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def build_manifest(folder: Path, **extra: Any) -> dict[str, Any]:
    files = file_entries(folder, artifact_files(folder))
    return {"schema": SCHEMA, "files": files, "total_bytes": sum(f["size"] for f in files), **extra}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def manifest_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_content(manifest: dict[str, Any], *, where: str) -> None:
    """The files a manifest lists are the ones it says were measured (``content_sha256``: the content
    digest of the model the benchmark loaded), else :class:`PublishError`; manifests without it pass."""
    measured = manifest.get("content_sha256")
    if measured is not None and (actual := content_digest(manifest["files"])) != measured:
        raise PublishError(f"{where}: its files (content {actual[:16]}) are not the files that were benchmarked "
                           f"(content {str(measured)[:16]}): they changed or came from another build; "
                           "nothing is published as measured. Run the factory again to rebuild and re-measure it")


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
    check_content(manifest, where=str(folder))
    return manifest
