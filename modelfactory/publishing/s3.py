"""Publish an artifact folder to ``s3://bucket/prefix``: files first, manifest last, then ``latest.json``.

Layout under the destination prefix::

    <name>/<config>/<key>/...files...          the artifact; <key> is the content digest of its files
    <name>/<config>/<key>/manifest.json        written last (IfNoneMatch): its presence means "complete"
    <name>/<config>/latest.json                pointer to the newest artifact of that model/config

The files go straight to the artifact's own prefix with the one S3 folder uploader
(:func:`modelfactory.s3.folders.upload_folder`: boto3's transfer manager, multipart, every part
SHA-256 checked), then the manifest, only if none exists. The key is the content digest of the
files (:func:`~modelfactory.core.manifest.content_digest`; checked here), so two publishers of one
key upload identical bytes to identical keys and neither can spoil the other's files before the
manifest race is decided: the first manifest stays, the other publisher gets ``reused=True``.

A failed attempt aborts its multipart uploads; files it had already put stay without a manifest
(no reader trusts them) until the next publish of that artifact writes the same bytes and the
manifest. Uploads left by a killed process are aborted by the next publish of the same artifact
(older than ``STALE_AFTER_S``) or by :func:`abort_stale_uploads`. An artifact whose manifest already
exists is not touched again (``reused=True``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from modelfactory.core.errors import PublishError
from modelfactory.core.log import progress
from modelfactory.core.manifest import (
    MANIFEST,
    artifact_files,
    content_digest,
    manifest_bytes,
    manifest_digest,
)
from modelfactory.core.records import Publication
from modelfactory.publishing.local import safe_join
from modelfactory.s3.client import (
    LATEST,
    S3Url,
    check_bucket,
    make_client,
    read_object,
    s3_errors,
)
from modelfactory.s3.folders import CHECKSUM, abort_uploads, upload_folder

#: Multipart uploads under an artifact's prefix older than this are treated as abandoned.
STALE_AFTER_S = 3600.0


def abort_stale_uploads(*, url: str, older_than_s: float = STALE_AFTER_S) -> int:
    """Abort the multipart uploads under a destination older than *older_than_s* (a killed publish's
    leftovers); how many. (A bucket lifecycle rule with ``AbortIncompleteMultipartUpload`` does the
    same on AWS.)"""
    root = S3Url.parse(url)
    client = make_client()
    with s3_errors("aborting stale uploads under", url=url, fatal=PublishError):
        return abort_uploads(client, root, older_than_s=older_than_s)


def _existing(client, final: S3Url) -> str | None:
    data = read_object(client, bucket=final.bucket, key=final.key(MANIFEST))
    return manifest_digest(data) if data is not None else None


def write_latest(client, *, model_dir: S3Url, final: S3Url, key: str, digest: str, total_bytes: int) -> None:
    pointer = {"uri": str(final), "key": key, "manifest_sha256": digest, "total_bytes": total_bytes,
               "updated_at": datetime.now(timezone.utc).isoformat()}
    client.put_object(Bucket=model_dir.bucket, Key=model_dir.key(LATEST), ContentType="application/json",
                      Body=json.dumps(pointer, indent=2, sort_keys=True).encode(), **CHECKSUM)


def publish_s3(*, source: Path, url: str, parts: tuple[str, str, str], manifest: dict) -> Publication:
    """Publish *source* under ``url/<name>/<config>/<key>/``; manifest last, then ``latest.json``."""
    safe_join(Path("."), *parts)  # same component rules as the local store
    root = S3Url.parse(url)
    name, config, key = parts
    if key != content_digest(manifest["files"]):
        raise PublishError(f"artifact key {key!r} is not the content digest of its files "
                           f"({content_digest(manifest['files'])}): S3 artifacts are keyed by content, so that "
                           "concurrent publishers of one key write the same bytes; publish with that key")
    model_dir, final = root.child(name, config), root.child(name, config, key)
    data = manifest_bytes(manifest)
    client = make_client()
    check_bucket(client, root)
    with s3_errors("publishing to", url=str(final), fatal=PublishError):
        if (digest := _existing(client, final)) is not None:
            progress(f"publish: {final} already has a manifest: reused")
            if read_object(client, bucket=model_dir.bucket, key=model_dir.key(LATEST)) is None:
                write_latest(client, model_dir=model_dir, final=final, key=key, digest=digest,
                             total_bytes=manifest["total_bytes"])
            return Publication(uri=str(final), manifest_sha256=digest, size_bytes=manifest["total_bytes"],
                               reused=True, destination="s3")
        stale = abort_uploads(client, final, older_than_s=STALE_AFTER_S)
        if stale:
            progress(f"publish: aborted {stale} abandoned multipart upload(s) under {final}")
        rel_paths = [f.relative_to(source).as_posix() for f in artifact_files(source)]
        listed = {f["path"] for f in manifest["files"]}
        if set(rel_paths) != listed:
            raise PublishError(f"{source} changed since its manifest was built (files {sorted(set(rel_paths) ^ listed)}"
                               "): run the publish step again")
        started = time.perf_counter()
        progress(f"publish: uploading {len(rel_paths)} files to {final}")
        wrote = upload_folder(client, folder=source, files=rel_paths, dest=final, marker_key=final.key(MANIFEST),
                              marker=data, private=False)
        digest = manifest_digest(data) if wrote else _existing(client, final)
        if wrote:
            write_latest(client, model_dir=model_dir, final=final, key=key, digest=digest,
                         total_bytes=manifest["total_bytes"])
        seconds = time.perf_counter() - started
        progress(f"publish: {manifest['total_bytes'] / 1e6:.1f} MB to {final} in {seconds:.1f} s "
                 f"({manifest['total_bytes'] / 1e6 / max(seconds, 1e-9):.0f} MB/s), manifest written last"
                 + ("" if wrote else "; another publisher's manifest was there first: reused"))
    return Publication(uri=str(final), manifest_sha256=digest, size_bytes=manifest["total_bytes"],
                       reused=not wrote, destination="s3")
