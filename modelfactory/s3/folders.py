"""An S3 "folder": files under a prefix, and a marker object written last that says it is complete.

One uploader for every folder the factory puts in S3: the stage store's step outputs
(:mod:`modelfactory.stage_store.remote`, marker ``_COMPLETE.json``) and published artifacts
(:mod:`modelfactory.publishing.s3`, marker ``manifest.json``).

:func:`upload_folder` puts the files with boto3's transfer manager (parallel, multipart for big
files, ``ChecksumAlgorithm=SHA256`` so S3 checks every part), then the marker with
``IfNoneMatch="*"``: of several writers of one folder, the first marker stays and the others learn
they lost. What a writer may clean up depends on whose files the prefix holds:

- ``private=True``: the prefix is this upload's own (the stage store's ``<key>/<attempt>/``): a failed
  or losing upload deletes it, so nothing unreferenced stays behind;
- ``private=False``: the prefix is shared by every writer of the folder (a published artifact, keyed by
  its content digest, so every writer puts identical bytes there): a failure only aborts this upload's
  own multipart uploads; files already up stay (no marker names them until one is written, and the
  next attempt writes the same bytes again).

:func:`download_files` fetches the files a marker lists, each download checked against S3's
stored SHA-256 (``ChecksumMode``); callers check the sha256 of the whole file against the marker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from modelfactory.core.log import progress
from modelfactory.s3.client import S3Url, make_manager

CHECKSUM = {"ChecksumAlgorithm": "SHA256"}


def upload_folder(client, *, folder: Path, files: Sequence[str], dest: S3Url, marker_key: str, marker: bytes,
                  private: bool) -> bool:
    """Upload *files* (paths relative to *folder*) under *dest*, then *marker* as ``marker_key`` (a key
    of *dest*'s bucket) unless one exists. ``True``: this marker was written; ``False``: another
    writer's was there first (a private *dest* is then deleted: the folder is the other writer's)."""
    try:
        with make_manager(client) as manager:
            futures = [manager.upload(str(folder / rel), dest.bucket, dest.key(rel), extra_args=dict(CHECKSUM))
                       for rel in files]
            # A failure leaves the `with`, whose exit cancels the other transfers (each aborts its multipart
            # upload). Not manager.shutdown(cancel=True): s3transfer's shutdown() passes its arguments on
            # shifted by one and raises TypeError whenever a transfer is still in flight.
            for future in futures:
                future.result()
    except BaseException:
        if private:
            discard_prefix(client, dest)
        raise
    if put_if_absent(client, bucket=dest.bucket, key=marker_key, data=marker):
        return True
    if private:
        discard_prefix(client, dest)
    return False


def put_if_absent(client, *, bucket: str, key: str, data: bytes) -> bool:
    """Write the JSON object *data* at ``bucket/key`` only if no object is there; ``False`` if one was."""
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json", IfNoneMatch="*",
                          **CHECKSUM)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def abort_uploads(client, url: S3Url, *, older_than_s: float = 0.0) -> int:
    """Abort the multipart uploads under *url* started more than *older_than_s* ago; how many."""
    cutoff = time.time() - older_than_s
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=url.bucket, Prefix=url.prefix):
        for upload in page.get("Uploads", []):
            if upload["Initiated"].timestamp() <= cutoff:
                client.abort_multipart_upload(Bucket=url.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    return aborted


def delete_prefix(client, url: S3Url) -> int:
    """Delete every object under *url*; how many."""
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=url.prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=url.bucket, Delete={"Objects": keys[start:start + 1000], "Quiet": True})
        deleted += len(keys)
    return deleted


def discard_prefix(client, url: S3Url) -> None:
    """Best effort: abort the multipart uploads and delete the objects under *url* (an upload's own prefix)."""
    try:
        abort_uploads(client, url)
        delete_prefix(client, url)
    except Exception as exc:  # noqa: BLE001 - the upload's own error matters more; leftovers are unreferenced
        progress(f"s3: could not remove the unfinished upload {url} ({type(exc).__name__}); no marker names it: "
                 "delete it by hand or with a lifecycle rule")


def download_files(client, *, source: S3Url, files: Sequence[str], dest: Path) -> None:
    """Download *files* (paths relative to *source*) into the folder *dest*, in parallel."""
    with make_manager(client) as manager:
        futures = []
        for rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(source.bucket, source.key(rel), str(target),
                                            extra_args={"ChecksumMode": "ENABLED"}))
        for future in futures:  # a failure cancels the rest on leaving the `with`
            future.result()
