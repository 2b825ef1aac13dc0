"""Publish an artifact folder to ``s3://bucket/prefix``: staging first, manifest last, then ``latest.json``.

Layout under the destination prefix::

    <name>/<config>/<key>/...files...          the artifact
    <name>/<config>/<key>/manifest.json        written last: its presence means "complete"
    <name>/<config>/latest.json                pointer to the newest artifact of that model/config
    _staging/<name>/<config>/<key>/<attempt>/  uploads in flight (removed after each attempt)

Files go up with boto3's transfer manager (multipart, parallel parts, ``ChecksumAlgorithm=SHA256``
so S3 checks every part) into a staging prefix of their own, then are copied server-side into
place; the manifest (``IfNoneMatch="*"``) is written only after every file is there. A failure
aborts this attempt's multipart uploads and deletes its staging objects; uploads left by a
killed process are aborted by the next publish of the same artifact (older than
``STALE_AFTER_S``) or by :func:`abort_stale_uploads`. An artifact whose manifest already
exists is not touched again (``reused=True``).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from modelfactory.core.errors import PublishError
from modelfactory.core.log import progress
from modelfactory.core.manifest import (
    MANIFEST,
    artifact_files,
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
    make_manager,
    read_object,
    s3_errors,
)

STAGING = "_staging"
#: Multipart uploads of an artifact's staging prefix older than this are treated as abandoned.
STALE_AFTER_S = 3600.0
CHECKSUM = {"ChecksumAlgorithm": "SHA256"}


def abort_uploads(client, url: S3Url, *, older_than_s: float = 0.0) -> int:
    """Abort multipart uploads under *url* started more than *older_than_s* ago; return how many."""
    cutoff = time.time() - older_than_s
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=url.bucket, Prefix=url.prefix):
        for upload in page.get("Uploads", []):
            if upload["Initiated"].timestamp() <= cutoff:
                client.abort_multipart_upload(Bucket=url.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    return aborted


def delete_prefix(client, url: S3Url) -> int:
    """Delete every object under *url* (a staging prefix); return how many."""
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=url.prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=url.bucket, Delete={"Objects": keys[start:start + 1000], "Quiet": True})
        deleted += len(keys)
    return deleted


def abort_stale_uploads(*, url: str, older_than_s: float = STALE_AFTER_S) -> int:
    """Clean ``_staging/`` under a destination: abort old multipart uploads (a killed publish's leftovers).

    Returns the number of uploads aborted. (A bucket lifecycle rule with
    ``AbortIncompleteMultipartUpload`` does the same on AWS.)
    """
    root = S3Url.parse(url)
    client = make_client()
    with s3_errors("aborting stale uploads under", url=url, fatal=PublishError):
        return abort_uploads(client, root.child(STAGING), older_than_s=older_than_s)


def upload_tree(client, *, source: Path, files: list[Path], dest: S3Url) -> None:
    """Upload *files* (under *source*) to *dest* in parallel (multipart for big files, SHA-256 checked)."""
    with make_manager(client) as manager:
        futures = [manager.upload(str(file), dest.bucket, dest.key(file.relative_to(source).as_posix()),
                                  extra_args=dict(CHECKSUM)) for file in files]
        # A failure leaves the `with`, whose exit cancels the other transfers (each aborts its multipart
        # upload). Not manager.shutdown(cancel=True): s3transfer's shutdown() passes its arguments on
        # shifted by one and raises TypeError whenever a transfer is still in flight.
        for future in futures:
            future.result()


def copy_tree(client, *, rel_paths: list[str], source: S3Url, dest: S3Url) -> None:
    """Server-side copy of *rel_paths* from *source* to *dest* (multipart copy for big objects)."""
    with make_manager(client) as manager:
        futures = [manager.copy({"Bucket": source.bucket, "Key": source.key(rel)}, dest.bucket, dest.key(rel),
                                extra_args=dict(CHECKSUM)) for rel in rel_paths]
        for future in futures:  # a failure cancels the rest on leaving the `with` (see upload_tree)
            future.result()


def _existing(client, final: S3Url) -> str | None:
    data = read_object(client, bucket=final.bucket, key=final.key(MANIFEST))
    return manifest_digest(data) if data is not None else None


def _put_manifest(client, final: S3Url, data: bytes) -> bool:
    """Write the manifest only if none exists; False when another publisher's won the race."""
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=final.bucket, Key=final.key(MANIFEST), Body=data,
                          ContentType="application/json", IfNoneMatch="*", **CHECKSUM)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


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
        staging_root = root.child(STAGING, name, config, key)
        stale = abort_uploads(client, staging_root, older_than_s=STALE_AFTER_S)
        if stale:
            progress(f"publish: aborted {stale} abandoned multipart upload(s) under {staging_root}")
        staging = staging_root.child(uuid.uuid4().hex[:12])
        files = artifact_files(source)
        listed = {f["path"] for f in manifest["files"]}
        rel_paths = [f.relative_to(source).as_posix() for f in files]
        if set(rel_paths) != listed:
            raise PublishError(f"{source} changed since its manifest was built (files {sorted(set(rel_paths) ^ listed)}"
                               "): run the publish step again")
        started = time.perf_counter()
        try:
            progress(f"publish: uploading {len(files)} files to staging {staging}")
            upload_tree(client, source=source, files=files, dest=staging)
            copy_tree(client, rel_paths=rel_paths, source=staging, dest=final)
        except BaseException:
            _cleanup(client, staging)
            raise
        wrote = _put_manifest(client, final, data)
        _cleanup(client, staging)
        digest = manifest_digest(data) if wrote else _existing(client, final)
        if wrote:
            write_latest(client, model_dir=model_dir, final=final, key=key, digest=digest,
                         total_bytes=manifest["total_bytes"])
        seconds = time.perf_counter() - started
        progress(f"publish: {manifest['total_bytes'] / 1e6:.1f} MB to {final} in {seconds:.1f} s "
                 f"({manifest['total_bytes'] / 1e6 / max(seconds, 1e-9):.0f} MB/s), manifest written last")
    return Publication(uri=str(final), manifest_sha256=digest, size_bytes=manifest["total_bytes"],
                       reused=not wrote, destination="s3")


def _cleanup(client, staging: S3Url) -> None:
    """Best effort: abort this attempt's multipart uploads and delete its staging objects."""
    try:
        abort_uploads(client, staging)
        delete_prefix(client, staging)
    except Exception as exc:  # the original error matters more; the next publish sweeps again
        progress(f"publish: could not clean staging {staging} ({type(exc).__name__}); the next publish retries")
