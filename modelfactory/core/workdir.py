"""Keyed step outputs: ``<work_dir>/<step>/<key>/``, reused when complete.

A step builds into a temporary sibling folder and renames it into place only after its
``_COMPLETE.json`` marker is written, so a crash never leaves a folder that looks complete.
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
from modelfactory.core.settings import get_settings

MARKER = "_COMPLETE.json"


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


@contextmanager
def building(step: str, key: str, *, root: Path | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, marker)``; fill *tmp_dir* and *marker*, and on success they become final.

    On an exception the temporary folder is removed and nothing is published.
    """
    final = step_dir(step, key, root=root)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    marker: dict[str, Any] = {"step": step, "key": key}
    try:
        yield tmp, marker
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        if final.exists():
            if (final / MARKER).is_file():  # a concurrent identical run finished first: keep theirs
                shutil.rmtree(tmp)
                return
            shutil.rmtree(final)  # leftovers of a crashed run
        os.replace(tmp, final)
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
