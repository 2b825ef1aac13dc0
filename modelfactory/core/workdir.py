"""Keyed step outputs: ``<work_dir>/<step>/<key>/``, reused when complete.

A step builds into a temporary sibling folder and renames it into place only after its
``_COMPLETE.json`` marker is written, so a crash never leaves a folder that looks complete.

``_COMPLETE.json`` has one meaning wherever a step output lies (this work dir, the stage store,
a host's stage cache: :mod:`modelfactory.stage_store`): the output is complete, and it says what
the step recorded about it (its own fields, e.g. ``quantize_s``) and every file of it (``files``:
path, size, sha256; ``total_bytes``). Its content digest
(:func:`~modelfactory.core.manifest.content_digest` of ``files``) is the output's identity.

One key, one output: when two builders of one key race (two hosts on a shared work dir, two sweep
members with one quantize key), the first complete output stays and the other builder adopts it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelfactory.core.errors import DiskFullError
from modelfactory.core.manifest import content_digest, file_entries
from modelfactory.core.settings import get_settings

MARKER = "_COMPLETE.json"
#: Keys of ``_COMPLETE.json`` that describe the files; a step's own fields must not use them.
FILE_KEYS = ("files", "total_bytes")


def step_dir(step: str, key: str, *, root: Path | None = None) -> Path:
    return (root or get_settings().resolved_work_dir) / step / key


def completed(step: str, key: str, *, root: Path | None = None) -> Path | None:
    """The finished output folder of *step* for *key*, or ``None``."""
    path = step_dir(step, key, root=root)
    return path if (path / MARKER).is_file() else None


def discard(step: str, key: str, *, root: Path | None = None) -> None:
    """Mark the output of *step* for *key* incomplete (a stored output found invalid): it is no
    longer reused, and the next :func:`building` of that key replaces it."""
    (step_dir(step, key, root=root) / MARKER).unlink(missing_ok=True)


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads((path / MARKER).read_text())


def marker_content(marker: dict[str, Any]) -> str | None:
    """The content digest of the output a ``_COMPLETE.json`` describes (``None``: it lists no files)."""
    files = marker.get("files")
    return content_digest(files) if isinstance(files, list) else None


def remove(step: str, key: str, *, root: Path | None = None) -> None:
    """Remove the output of *step* for *key* (renamed away first, so it vanishes at once)."""
    _remove(step_dir(step, key, root=root))


def _remove(folder: Path) -> None:
    trash = folder.parent / f".{folder.name}.trash-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def commit_folder(tmp: Path, final: Path, *, marker: str = MARKER) -> bool:
    """Rename the complete folder *tmp* (its *marker* file written last) into place as *final*. A complete
    *final* already there (another writer got there first, possibly right between our check and our
    rename) is kept and *tmp* removed: ``False``. Leftovers without the marker are replaced."""
    for _attempt in range(5):
        if (final / marker).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if final.exists():
            _remove(final)  # leftovers of a crashed writer
        try:
            os.replace(tmp, final)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.EEXIST, f"{final} keeps reappearing without its {marker} while this writer commits; "
                                "another process is writing it: run again")


@contextmanager
def building(step: str, key: str, *, root: Path | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, marker)``; fill *tmp_dir* and *marker*, and on success they become final
    (the marker with every file's size and sha256 added).

    On an exception the temporary folder is removed and nothing is published.
    """
    final = step_dir(step, key, root=root)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    marker: dict[str, Any] = {"step": step, "key": key}
    try:
        yield tmp, marker
        files = file_entries(tmp, sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MARKER))
        marker.update(files=files, total_bytes=sum(f["size"] for f in files))
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        commit_folder(tmp, final)  # a concurrent identical build that finished first is kept
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise disk_full_error(final.parent, f"the {step} step", exc) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_full_error(where: Path, what: str, exc: OSError, *, kind: type[DiskFullError] = DiskFullError) -> DiskFullError:
    """A :class:`DiskFullError` for *what* writing under *where*, with the free space left there."""
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return kind(
        f"{what} ran out of disk space writing under {where} ({exc.strerror}; {free}); its partial files "
        f"were removed: free space there, or point MODELFACTORY_WORK_DIR / MODELFACTORY_STORE_URL at a "
        f"bigger disk, then run again"
    )
