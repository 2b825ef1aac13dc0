"""The local artifact store: a folder (``file://`` URL or plain path) where passing models are published.

``<root>/<name>/<config>/<key>/`` holds the files, ``manifest.json`` written last; the key is the
content digest of the files (:func:`~modelfactory.core.manifest.content_digest`), so one key
always means the same bytes. The other
destinations are :mod:`modelfactory.publishing.s3` (``s3://``) and :mod:`modelfactory.publishing.hub`
(``hf://``); ``tasks/publish.py`` picks one by the destination's scheme.
"""

from __future__ import annotations

import errno
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from modelfactory.core.errors import PublishDiskFullError, PublishError, SpecError
from modelfactory.core.manifest import (
    MANIFEST,
    artifact_files,
    manifest_bytes,
    manifest_digest,
)
from modelfactory.core.workdir import commit_folder, disk_full_error


def local_root(url: str) -> Path:
    """The folder of a ``file://`` store URL (a plain path is accepted too)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else url)).expanduser()
    raise SpecError(f"{url!r} is not a local artifact store: use a file:// URL or a local path")


def safe_join(root: Path, *parts: str) -> Path:
    """Join *parts* under *root*, refusing anything that would escape it."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or part.startswith("."):
            raise SpecError(f"artifact path component {part!r} is not allowed: use plain names")
    path = root.joinpath(*parts)
    # A symlink inside the store (e.g. store/name -> /etc) must not carry a publish outside it.
    if not path.resolve().is_relative_to(root.resolve()):
        raise SpecError(
            f"artifact path {str(path)!r} resolves to {str(path.resolve())!r}, outside the store {str(root)!r} "
            f"(a symlink in the store?): remove the link or publish elsewhere"
        )
    return path


def publish_local(*, source: Path, root: Path, parts: tuple[str, ...], manifest: dict) -> tuple[Path, str, bool]:
    """Copy *source*'s files to ``root/parts...`` and write the manifest last.

    The files and the manifest go into a temporary sibling folder that is renamed into place, so a
    reader never sees a half-copied artifact and two publishers of one artifact at once never touch
    each other's files: the first rename wins, the other finds the artifact complete.
    Returns ``(folder, manifest_sha256, reused)``; an identical artifact already there is a no-op.
    """
    dest = safe_join(root, *parts)
    data = manifest_bytes(manifest)
    if (dest / MANIFEST).is_file():
        return dest, manifest_digest((dest / MANIFEST).read_bytes()), True
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for file in artifact_files(source):
            target = tmp / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
        (tmp / MANIFEST).write_bytes(data)
        if not commit_folder(tmp, dest, marker=MANIFEST):
            return dest, manifest_digest((dest / MANIFEST).read_bytes()), True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise disk_full_error(root, "publishing", exc, kind=PublishDiskFullError) from exc
        raise PublishError(f"publishing to {dest} failed ({exc}); partial files were removed, fix and retry") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, manifest_digest(data), False
