"""The stage store's S3 side: step outputs uploaded with their completion marker last.

Layout under ``MODELFACTORY_STAGE_STORE_URL`` (``s3://bucket/prefix``)::

    <step>/<key>/_COMPLETE.json       the completion marker, written LAST and only once (IfNoneMatch)
    <step>/<key>/<attempt>/<files>    the files, as one upload attempt put them
    gpu-stage/runs/<flow_run_id>.json small records (the GPU stage's outcome)

The marker is the output's own ``_COMPLETE.json`` (:mod:`modelfactory.core.workdir`: what the
step recorded, and ``files`` with path, size and sha256, ``total_bytes``) plus ``data``: the attempt
prefix its files are under, and who uploaded it when. Files go to an attempt prefix of their own,
so two hosts uploading the same key at once (different bytes: GPU kernels are not bit-reproducible)
never mix their files: the first marker written wins, the loser deletes its attempt and adopts the
winner's output (:func:`modelfactory.stage_store.publish`). A reader trusts nothing without a
marker, and checks every file's sha256 against it (:mod:`modelfactory.stage_store.cache`).
"""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelfactory.core.errors import SpecError, StageStoreError
from modelfactory.core.log import progress
from modelfactory.core.manifest import SCHEMA, file_entries, manifest_bytes
from modelfactory.core.settings import get_settings
from modelfactory.core.workdir import FILE_KEYS, MARKER
from modelfactory.s3.client import S3Url, make_client, read_object, s3_errors
from modelfactory.s3.folders import CHECKSUM, discard_prefix, download_files, upload_folder


def store_root() -> S3Url | None:
    """The configured stage store, or ``None`` (step outputs stay in the local work dir)."""
    url = get_settings().stage_store_url
    if not url:
        return None
    try:
        return S3Url.parse(url)
    except SpecError as exc:
        raise SpecError(f"MODELFACTORY_STAGE_STORE_URL={url!r} is not an S3 prefix: set it to "
                        "s3://bucket/prefix, or unset it to keep step outputs in the local work dir") from exc


def output_url(root: S3Url, step: str, key: str) -> S3Url:
    return root.child(step, key)


def step_of(root: S3Url, url: S3Url) -> tuple[str, str] | None:
    """``(step, key)`` when *url* is a step output folder of the store at *root*, else ``None``."""
    if url.bucket != root.bucket or not url.prefix.startswith(root.prefix):
        return None
    parts = url.prefix[len(root.prefix):].strip("/").split("/")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def output_files(folder: Path) -> list[Path]:
    """The files of a step output folder (its own completion marker travels inside the store's)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MARKER)


def build_manifest(folder: Path, *, step: str, key: str, marker: dict[str, Any], data: str) -> dict[str, Any]:
    """The store's completion marker for *folder*: its ``_COMPLETE.json`` *marker* (every file's size
    and sha256, hashed here when the marker does not list them: a shared folder), where the files are."""
    if not all(name in marker for name in FILE_KEYS):
        files = file_entries(folder, output_files(folder))
        marker = {**marker, "files": files, "total_bytes": sum(f["size"] for f in files)}
    return {**marker, "schema": SCHEMA, "step": step, "key": key, "data": data, "host": socket.gethostname(),
            "created_at": datetime.now(UTC).isoformat()}


def read_marker(client, url: S3Url) -> bytes | None:
    """The completion marker of the output at *url*, or ``None`` while it is not complete."""
    with s3_errors("reading the completion marker of", url=str(url), fatal=StageStoreError):
        return read_object(client, bucket=url.bucket, key=url.key(MARKER))


def upload_output(*, root: S3Url, step: str, key: str, folder: Path, marker: dict[str, Any]) -> bytes:
    """Upload the complete step output *folder* as ``<step>/<key>`` (files first, marker last).

    Returns the marker in the store: this upload's, or the one already there (then nothing is
    uploaded: the output is complete in the store, possibly built on another host).
    """
    url = output_url(root, step, key)
    client = make_client()
    if (existing := read_marker(client, url)) is not None:
        return existing
    attempt = uuid.uuid4().hex[:12]
    manifest = build_manifest(folder, step=step, key=key, marker=marker, data=f"{attempt}/")
    data = manifest_bytes(manifest)
    progress(f"{step}: uploading {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB to the "
             f"stage store {url}")
    with s3_errors(f"uploading the {step} output to", url=str(url), fatal=StageStoreError):
        if upload_folder(client, folder=folder, files=[e["path"] for e in manifest["files"]], dest=url.child(attempt),
                         marker_key=url.key(MARKER), marker=data, private=True):
            return data
        progress(f"{step}: {url} was completed by another host meanwhile: using that one")
        theirs = read_marker(client, url)
        if theirs is None:
            raise StageStoreError(f"{url}: the completion marker was refused as existing but cannot be read: "
                                  "check the bucket's consistency, then run again")
        return theirs


def delete_output(*, root: S3Url, step: str, key: str) -> None:
    """Remove the output ``<step>/<key>`` from the store: its marker first (from then on it is not
    complete for any reader), then the files of every attempt under it."""
    url = output_url(root, step, key)
    client = make_client()
    with s3_errors(f"removing the {step} output", url=str(url), fatal=StageStoreError):
        client.delete_object(Bucket=url.bucket, Key=url.key(MARKER))
        discard_prefix(client, url)


def download_output(client, *, url: S3Url, manifest: dict[str, Any], dest: Path) -> None:
    """Download every file the marker *manifest* of the output at *url* lists into *dest*."""
    download_files(client, source=url.child(manifest["data"]), files=[e["path"] for e in manifest["files"]],
                   dest=dest)


def put_record(root: S3Url, rel: str, data: bytes) -> str:
    """Write the small record *rel* (e.g. ``gpu-stage/runs/<id>.json``) to the store; its URI."""
    client = make_client()
    uri = f"s3://{root.bucket}/{root.key(rel)}"
    with s3_errors("writing the record", url=uri, fatal=StageStoreError):
        client.put_object(Bucket=root.bucket, Key=root.key(rel), Body=data, ContentType="application/json",
                          **CHECKSUM)
    return uri


def get_record(root: S3Url, rel: str) -> bytes | None:
    client = make_client()
    with s3_errors("reading the record", url=f"s3://{root.bucket}/{root.key(rel)}", fatal=StageStoreError):
        return read_object(client, bucket=root.bucket, key=root.key(rel))


def parse_marker(url: S3Url, data: bytes) -> dict[str, Any]:
    """The completion marker *data* of the output at *url*, checked for the fields readers use."""
    try:
        manifest = json.loads(data)
        missing = {*FILE_KEYS, "data"} - set(manifest)
    except (ValueError, TypeError) as exc:
        missing, manifest = {f"valid JSON ({exc})"}, None
    if missing:
        raise StageStoreError(f"{url}: its completion marker {MARKER} is not a stage-store manifest (no "
                              f"{', '.join(sorted(missing))}); delete that prefix and run the step again")
    return manifest
