"""This host's cache of step outputs fetched from the stage store, addressed by content, bounded in size.

Layout under ``MODELFACTORY_STAGE_CACHE_DIR`` (default ``<home>/cache/stage``)::

    objects/<digest>/          a fetched output: its files and its _COMPLETE.json (the store's marker)
    objects/.<digest>.lock     held while this host fetches <digest> (a second fetch waits, then reuses)
    objects/.<digest>.use      shared-locked by every process using <digest>; its mtime is the last use
    objects/.<digest>.tmp-*/   a fetch in progress (removed when it fails)
    links/<step>/<key>         symlink to a folder of this host shared under that key (a local model
                               folder, a Hub snapshot): resolving its URI here downloads nothing

``<digest>`` is the sha256 of the output's completion marker in the store, which lists every
file's sha256: one digest, one content. A fetch downloads into a temporary folder, checks every
file against the marker, writes the marker last and renames the folder into place, so a reader
never sees half an output and a corrupted download is never kept. Entries never change once there.

The cache is bounded (``MODELFACTORY_STAGE_CACHE_MAX_GB``, default 200): before a fetch, the least
recently used entries are evicted until the new one fits. An entry is *in use* while a process that
resolved it is alive (it holds a shared ``flock`` on ``.<digest>.use`` from then until it exits: a GPU
worker runs each flow run in its own process), and an entry in use is never evicted: the evictor
needs that lock exclusively, and a reader takes it before looking at the entry. When everything left
is in use, the cache grows past its bound for a while and says so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from modelfactory.core import workdir
from modelfactory.core.errors import StageStoreError
from modelfactory.core.hashing import file_sha256
from modelfactory.core.log import progress
from modelfactory.core.manifest import manifest_digest
from modelfactory.core.settings import get_settings
from modelfactory.s3.client import S3Url, s3_errors
from modelfactory.stage_store.remote import download_output, parse_marker


def cache_root() -> Path:
    return get_settings().resolved_stage_cache_dir


def object_dir(digest: str) -> Path:
    return cache_root() / "objects" / digest


@contextmanager
def _fetch_lock(digest: str) -> Iterator[None]:
    """One fetch of *digest* at a time on this host (the cache is per host: a flock suffices)."""
    path = cache_root() / "objects" / f".{digest}.lock"
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


#: The ``.use`` files (by path) this process holds shared, one per entry it resolved, open until it exits.
_IN_USE: dict[str, Any] = {}
_IN_USE_LOCK = threading.Lock()


def _use_path(digest: str) -> Path:
    return cache_root() / "objects" / f".{digest}.use"


def _hold(digest: str) -> None:
    """Mark *digest* as used by this process until it exits (shared flock), and as used now (LRU)."""
    path = _use_path(digest)
    with _IN_USE_LOCK:
        if str(path) not in _IN_USE:
            handle = open(path, "a+")  # noqa: SIM115 - kept open (the hold) until the process exits
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)  # waits while an evictor removes the entry
            _IN_USE[str(path)] = handle
    os.utime(path)


def entry_bytes(folder: Path) -> int:
    """The size of a cache entry: its marker's ``total_bytes`` (else the files on disk)."""
    try:
        return int(json.loads((folder / workdir.MARKER).read_text())["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_room(incoming: int) -> None:
    """Evict least recently used entries not in use until *incoming* more bytes fit the bound."""
    bound = int(get_settings().stage_cache_max_gb * 1e9)
    objects = cache_root() / "objects"
    entries = [p for p in objects.iterdir() if p.is_dir() and not p.name.startswith(".")] if objects.is_dir() else []
    sizes = {p: entry_bytes(p) for p in entries}
    used = sum(sizes.values())
    if used + incoming <= bound:
        return

    def last_use(folder: Path) -> float:
        stamp = _use_path(folder.name)
        return stamp.stat().st_mtime if stamp.exists() else folder.stat().st_mtime

    for folder in sorted(entries, key=last_use):
        if used + incoming <= bound:
            break
        if _evict(folder):
            used -= sizes[folder]
            progress(f"stage cache: evicted {folder.name[:12]} ({sizes[folder] / 1e9:.2f} GB, least recently used) "
                     f"to stay under MODELFACTORY_STAGE_CACHE_MAX_GB={get_settings().stage_cache_max_gb:g}")
    if used + incoming > bound:
        progress(f"stage cache: {(used + incoming) / 1e9:.2f} GB needed, over MODELFACTORY_STAGE_CACHE_MAX_GB="
                 f"{get_settings().stage_cache_max_gb:g}: every other entry is in use by a running process; "
                 "it shrinks once they end")


def _evict(folder: Path) -> bool:
    """Remove the entry *folder* unless a process uses it; whether it was removed."""
    with open(_use_path(folder.name), "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        try:
            trash = folder.parent / f".{folder.name}.evicted-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, trash)
            except FileNotFoundError:
                return False
            shutil.rmtree(trash, ignore_errors=True)
            return True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _safe(url: S3Url, rel: str) -> str:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(p in ("", ".", "..") for p in path.parts) or "\\" in rel:
        raise StageStoreError(f"{url}: its completion marker lists the path {rel!r}, which would escape the "
                              "cache folder: refusing it; delete that prefix and run the step again")
    return path.as_posix()


def mismatches(manifest: dict[str, Any], folder: Path) -> list[str]:
    """The files of *manifest* missing from *folder* or differing from their size/sha256 there."""
    def bad(entry: dict[str, Any]) -> bool:
        file = folder / entry["path"]
        return not file.is_file() or file.stat().st_size != entry["size"] or file_sha256(file) != entry["sha256"]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        flags = list(pool.map(bad, manifest["files"]))
    return [entry["path"] for entry, flag in zip(manifest["files"], flags) if flag]


def fetch(client, *, url: S3Url, data: bytes) -> Path:
    """The output at *url* (completion marker *data*) in this host's cache: reused, or downloaded and checked."""
    digest = manifest_digest(data)
    final = object_dir(digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    _hold(digest)  # in use by this process from now on: never evicted under it
    if final.is_dir():
        return final
    manifest = parse_marker(url, data)
    for entry in manifest["files"]:
        _safe(url, entry["path"])
    with _fetch_lock(digest):
        if final.is_dir():  # another process of this host fetched it while we waited
            return final
        make_room(int(manifest["total_bytes"]))
        tmp = final.parent / f".{digest}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            progress(f"stage store: fetching {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB "
                     f"of {url} into {final}")
            with s3_errors("fetching", url=str(url), fatal=StageStoreError):
                download_output(client, url=url, manifest=manifest, dest=tmp)
            if bad := mismatches(manifest, tmp):
                raise StageStoreError(
                    f"{url}: {bad[:5]} do not match their size/sha256 in the completion marker after download "
                    f"({len(bad)} of {len(manifest['files'])} files): the stored output is corrupt. Delete the "
                    f"prefix {url} so the step is built again, then rerun")
            (tmp / workdir.MARKER).write_bytes(data)  # the output's _COMPLETE.json, as in the store
            os.rename(tmp, final)  # atomic; the lock makes it the only writer of *final*
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise workdir.disk_full_error(final.parent, f"fetching {url} into the stage cache", exc) from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def link(step: str, key: str, folder: Path) -> None:
    """Remember that this host's *folder* is the output shared as ``<step>/<key>`` (atomically)."""
    path = cache_root() / "links" / step / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.symlink_to(folder.resolve(), target_is_directory=True)
    os.replace(tmp, path)


def linked(step: str, key: str) -> Path | None:
    """The folder of this host shared as ``<step>/<key>``, when it is still there."""
    path = cache_root() / "links" / step / key
    return path.resolve() if path.is_symlink() and path.resolve().is_dir() else None
