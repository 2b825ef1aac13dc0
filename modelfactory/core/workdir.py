"""Keyed step outputs: ``<work_dir>/<step>/<key>/``, reused when complete.

A step builds into a temporary sibling folder and renames it into place only after its
``_COMPLETE.json`` marker is written, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
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


@contextmanager
def run_lock(key: str, *, root: Path | None = None, poll_s: float = 1.0,
             on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the lock of run key *key* (a ``flock`` on ``<work_dir>/locks/<key>.lock``).

    Two identical runs started together: the second waits here until the first is done, then
    finds every step output complete and reuses it. The kernel drops the lock when its holder
    dies, so a crashed run never blocks the next one. Works across processes on one host and on
    shared file systems with ``flock`` support. The factory flow uses the catalog's run-key claim
    instead (``modelfactory/catalog/claims.py``), which also holds across hosts without a shared disk.
    """
    folder = (root or get_settings().resolved_work_dir) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.lock"
    with open(path, "a+") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait(f"an identical run (key {key[:12]}) is in progress: waiting for it to finish")
                waited = True
                time.sleep(poll_s)
        try:
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
