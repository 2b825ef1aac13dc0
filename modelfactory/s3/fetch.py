"""Read from S3: artifacts by their manifest (every sha256 checked) and plain prefixes as model sources.

- :func:`resolve_artifact` finds the manifest of an artifact URL (or follows ``latest.json``);
  :func:`open_artifact` does so with a client, the bucket checked and S3 errors mapped.
- :func:`verify_s3` streams every file listed in the manifest and checks size + sha256.
- :func:`download_s3` downloads an artifact into a folder, checks it, writes the manifest last.
- :func:`fetch_source` downloads a base model / adapter prefix into the keyed work dir
  (``download/<key>``), keyed by the manifest's sha256 when the prefix has one, else by a hash
  of the listing (keys, sizes, ETags); a second fetch of the same content is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from modelfactory.core import workdir
from modelfactory.core.errors import (
    ModelFactoryError,
    PublishError,
    SourceError,
    SourceNotFoundError,
)
from modelfactory.core.hashing import file_sha256, step_key
from modelfactory.core.log import progress
from modelfactory.core.manifest import MANIFEST, check_content, manifest_digest
from modelfactory.core.settings import get_settings
from modelfactory.s3.client import (
    LATEST,
    S3Url,
    check_bucket,
    make_client,
    read_object,
    s3_errors,
)
from modelfactory.s3.folders import download_files

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- artifacts
def _safe_rel(rel: str, *, where: str, error: type[ModelFactoryError]) -> str:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(p in ("", ".", "..") for p in path.parts) or "\\" in rel:
        raise error(f"{where} lists the path {rel!r}, which would escape the destination folder: refusing it")
    return path.as_posix()


def resolve_artifact(client, url: S3Url) -> tuple[S3Url, bytes]:
    """The artifact folder and its manifest bytes; a model/config folder is followed via ``latest.json``."""
    data = read_object(client, bucket=url.bucket, key=url.key(MANIFEST))
    if data is not None:
        return url, data
    pointer = read_object(client, bucket=url.bucket, key=url.key(LATEST))
    if pointer is not None:
        target = S3Url.parse(json.loads(pointer)["uri"])
        data = read_object(client, bucket=target.bucket, key=target.key(MANIFEST))
        if data is not None:
            return target, data
    raise PublishError(f"{url} has no {MANIFEST} (nor a {LATEST} pointing at one): the artifact is missing or "
                       "its upload did not finish; check the URL or publish it again")


@contextmanager
def open_artifact(what: str, *, url: str) -> Iterator[tuple[Any, S3Url, bytes]]:
    """``(client, artifact folder, manifest bytes)`` of the artifact at *url*, for *what* (e.g. "verifying")
    to run inside: S3 failures in the block become factory errors (:func:`s3_errors`)."""
    root = S3Url.parse(url)
    client = make_client()
    check_bucket(client, root)
    with s3_errors(what, url=url, fatal=PublishError):
        folder, data = resolve_artifact(client, root)
        yield client, folder, data


def _hash_object(client, bucket: str, key: str) -> tuple[int, str]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    digest, size = hashlib.sha256(), 0
    for chunk in body.iter_chunks(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def verify_s3(*, url: str) -> dict[str, Any]:
    """Stream every file of the artifact at *url* and check its size and sha256 against the manifest."""
    with open_artifact("verifying", url=url) as (client, folder, data):
        manifest = json.loads(data)
        entries = manifest["files"]
        progress(f"verify: {len(entries)} files, {manifest['total_bytes'] / 1e6:.1f} MB under {folder}")
        with ThreadPoolExecutor(max_workers=get_settings().s3_max_concurrency) as pool:
            results = list(pool.map(lambda e: _hash_object(client, folder.bucket, folder.key(e["path"])), entries))
    for entry, (size, sha) in zip(entries, results):
        if size != entry["size"] or sha != entry["sha256"]:
            raise PublishError(f"{folder.key(entry['path'])} in {folder} does not match the manifest "
                               f"(size {size} vs {entry['size']}, sha256 {sha[:12]} vs {entry['sha256'][:12]}): "
                               "the artifact is corrupt; publish it again")
    check_content(manifest, where=str(folder))
    return {**manifest, "uri": str(folder), "manifest_sha256": manifest_digest(data)}


def _check_files(entries: list[dict], dest: Path, *, where: str, error: type[ModelFactoryError]) -> None:
    def check(entry: dict) -> str | None:
        file = dest / entry["path"]
        if file.stat().st_size != entry["size"] or file_sha256(file) != entry["sha256"]:
            return entry["path"]
        return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        bad = [p for p in pool.map(check, entries) if p]
    if bad:
        raise error(f"{where}: {bad[:5]} do not match the manifest's sha256/size after download; "
                    "the stored artifact is corrupt or changed during the download: publish it again")


def download_s3(*, url: str, dest: Path) -> dict[str, Any]:
    """Download the artifact at *url* into *dest* (created; must not hold another artifact).

    Files land in a temporary sibling folder, every sha256 is checked, ``manifest.json`` is
    written last and the folder is renamed into place. *dest* already holding the same
    manifest is a no-op (``reused: True`` in the returned dict).
    """
    with open_artifact("downloading", url=url) as (client, folder, data):
        manifest = json.loads(data)
        check_content(manifest, where=str(folder))
        digest = manifest_digest(data)
        if (dest / MANIFEST).is_file() and manifest_digest((dest / MANIFEST).read_bytes()) == digest:
            return {**manifest, "uri": str(folder), "manifest_sha256": digest, "reused": True}
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise PublishError(f"download destination {dest} exists and is not empty: pass a new or empty folder")
        rels = [_safe_rel(e["path"], where=f"manifest of {folder}", error=PublishError) for e in manifest["files"]]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            progress(f"download: {len(rels)} files, {manifest['total_bytes'] / 1e6:.1f} MB from {folder}")
            download_files(client, source=folder, files=rels, dest=tmp)
            _check_files(manifest["files"], tmp, where=str(folder), error=PublishError)
            (tmp / MANIFEST).write_bytes(data)
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "uri": str(folder), "manifest_sha256": digest, "reused": False}


# --------------------------------------------------------------------------- sources
def _listing(client, url: S3Url) -> list[dict]:
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=url.prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(url.prefix):]
            if rel and not rel.endswith("/"):  # skip "folder" marker objects
                objects.append({"path": rel, "size": obj["Size"], "etag": obj["ETag"].strip('"')})
    return sorted(objects, key=lambda o: o["path"])


def listing_sha256(objects: list[dict]) -> str:
    """Content identity of a prefix without a manifest: keys, sizes and ETags."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(f"{obj['path']}\0{obj['size']}\0{obj['etag']}\n".encode())
    return digest.hexdigest()


def fetch_source(*, url: str, what: str) -> tuple[Path, str, bool]:
    """Download the prefix *url* (a base model or adapter) into the keyed work dir.

    Returns ``(folder, content_sha, reused)``. A prefix holding ``manifest.json`` (a published
    artifact) is identified by the manifest's sha256 and every file is checked against it;
    otherwise by :func:`listing_sha256`, and a listing that changes during the download fails.
    """
    root = S3Url.parse(url)
    client = make_client()
    check_bucket(client, root, fatal=SourceError, missing=SourceNotFoundError)
    with s3_errors(f"downloading {what}", url=url, fatal=SourceError, not_found=SourceNotFoundError):
        objects = _listing(client, root)
        if not objects:
            raise SourceNotFoundError(f"{what} {url}: no objects under this prefix; check the bucket and prefix")
        manifest_data = read_object(client, bucket=root.bucket, key=root.key(MANIFEST)) if any(
            o["path"] == MANIFEST for o in objects) else None
        if manifest_data is not None:
            sha = manifest_digest(manifest_data)
            entries = json.loads(manifest_data)["files"]
        else:
            sha, entries = listing_sha256(objects), objects
        key = step_key("s3", sha=sha)
        if (done := workdir.completed("download", key)) is not None:
            progress(f"download: {what} {url} (sha {sha[:12]}) already downloaded: reused")
            return done, sha, True
        rels = [_safe_rel(e["path"], where=f"{what} {url}", error=SourceError) for e in entries]
        total = sum(e["size"] for e in entries)
        progress(f"download: {what} {url}: {len(rels)} files, {total / 1e6:.1f} MB")
        with workdir.building("download", key) as (tmp, marker):
            download_files(client, source=root, files=rels, dest=tmp)
            if manifest_data is not None:
                _check_files(entries, tmp, where=f"{what} {url}", error=SourceError)
                (tmp / MANIFEST).write_bytes(manifest_data)
            else:
                for entry in entries:
                    if (tmp / entry["path"]).stat().st_size != entry["size"]:
                        raise SourceError(f"{what} {url}: {entry['path']} changed during the download; retry")
                if listing_sha256(_listing(client, root)) != sha:
                    raise SourceError(f"{what} {url}: the prefix changed during the download; retry when "
                                      "it is stable")
            marker.update(source=url, sha=sha, manifest=manifest_data is not None)
    return workdir.step_dir("download", key), sha, False
