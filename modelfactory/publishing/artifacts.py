"""Read published artifacts back, whatever the store: ``s3://...`` or ``file://...`` (or a plain path).

Both functions check every file's size and sha256 against the artifact's ``manifest.json`` and
return the manifest plus ``uri`` and ``manifest_sha256`` (and ``reused`` for downloads).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from modelfactory.core.errors import PublishError, SpecError
from modelfactory.core.manifest import MANIFEST, manifest_digest, verify_folder
from modelfactory.publishing.local import local_root


def _scheme(uri: str) -> Literal["s3", "file"]:
    scheme = urlparse(uri).scheme
    if scheme in ("s3", "file", ""):
        return "s3" if scheme == "s3" else "file"
    raise SpecError(f"artifact URI {uri!r}: only s3:// and file:// (or a local path) can be read back")


def verify_artifact(*, uri: str) -> dict[str, Any]:
    """Check every file of the artifact at *uri* against its manifest; return the manifest."""
    if _scheme(uri) == "s3":
        from modelfactory.s3 import verify_s3

        return verify_s3(url=uri)
    folder = local_root(uri)
    manifest = verify_folder(folder)
    return {**manifest, "uri": folder.resolve().as_uri(),
            "manifest_sha256": manifest_digest((folder / MANIFEST).read_bytes())}


def download_artifact(*, uri: str, dest: Path) -> dict[str, Any]:
    """Copy the artifact at *uri* into the folder *dest*, verified, manifest written last."""
    if _scheme(uri) == "s3":
        from modelfactory.s3 import download_s3

        return download_s3(url=uri, dest=dest)
    source = verify_artifact(uri=uri)
    folder = local_root(uri)
    data = (folder / MANIFEST).read_bytes()
    if (dest / MANIFEST).is_file() and manifest_digest((dest / MANIFEST).read_bytes()) == source["manifest_sha256"]:
        return {**source, "reused": True}
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PublishError(f"download destination {dest} exists and is not empty: pass a new or empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for entry in source["files"]:
            target = tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / entry["path"], target)
        (tmp / MANIFEST).write_bytes(data)
        verify_folder(tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except OSError as exc:
        raise PublishError(f"copying {uri} to {dest} failed ({exc}): fix the destination and retry") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**source, "reused": False}
