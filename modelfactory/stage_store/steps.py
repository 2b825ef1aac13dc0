"""Step outputs by URI: what the steps call (find / publish / share / resolve, and small records).

With no stage store configured every function keeps today's behaviour: a step output's URI is
its folder in the local work dir, and resolving a path returns it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfactory.core import workdir
from modelfactory.core.errors import StageStoreError
from modelfactory.core.settings import get_settings
from modelfactory.s3.client import S3Url, make_client
from modelfactory.stage_store import cache, remote


@dataclass(frozen=True)
class StepOutput:
    """A complete step output: where every host finds it, and what the step recorded about it."""

    step: str
    key: str
    #: ``s3://<store>/<step>/<key>/`` with a stage store, else the folder in the local work dir.
    uri: str
    #: The step's completion marker (e.g. the quantization time, the merge's logit difference).
    marker: dict[str, Any]

    def folder(self) -> Path:
        """The output's files on this host (fetched into the cache when they were built elsewhere)."""
        return resolve(self.uri)


def configured() -> bool:
    """Whether step outputs move through a stage store (``MODELFACTORY_STAGE_STORE_URL``)."""
    return remote.store_root() is not None


def find(step: str, key: str) -> StepOutput | None:
    """The complete output of *step* for *key*: in this host's work dir, else in the stage store.

    An output found only in the store is not downloaded here (:meth:`StepOutput.folder` does that
    when a later step needs the files); one found only locally is uploaded first, so its URI holds.
    """
    if workdir.completed(step, key) is not None:
        return publish(step, key)
    root = remote.store_root()
    if root is None:
        return None
    url = remote.output_url(root, step, key)
    data = remote.read_marker(make_client(), url)
    if data is None:
        return None
    return StepOutput(step=step, key=key, uri=str(url), marker=remote.parse_marker(url, data)["marker"])


def publish(step: str, key: str) -> StepOutput:
    """The complete local output ``<work_dir>/<step>/<key>``, uploaded to the stage store if one is set."""
    folder = workdir.step_dir(step, key)
    marker = workdir.read_marker(folder)
    root = remote.store_root()
    if root is None:
        return StepOutput(step=step, key=key, uri=str(folder), marker=marker)
    remote.upload_output(root=root, step=step, key=key, folder=folder, marker=marker)
    return StepOutput(step=step, key=key, uri=str(remote.output_url(root, step, key)), marker=marker)


def share(folder: Path, *, step: str, key: str, marker: dict[str, Any]) -> str:
    """The URI other hosts reach *folder* by: a folder outside the work dir (a local model, a Hub
    snapshot) uploaded as ``<step>/<key>``; with no stage store, the folder itself."""
    root = remote.store_root()
    if root is None:
        return str(folder)
    remote.upload_output(root=root, step=step, key=key, folder=folder, marker=marker)
    cache.link(step, key, folder)
    return str(remote.output_url(root, step, key))


def resolve(uri: str) -> Path:
    """The local folder of a step output *uri*: a path as is; an ``s3://`` output from this host's
    work dir or shared folders when it was built here, else from the cache (fetched and checked)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    url = S3Url.parse(uri)
    root = remote.store_root()
    if root is not None and (step_key := remote.step_of(root, url)) is not None:
        if (done := workdir.completed(*step_key)) is not None:
            return done
        if (folder := cache.linked(*step_key)) is not None:
            return folder
    client = make_client()
    data = remote.read_marker(client, url)
    if data is None:
        raise StageStoreError(f"{uri} has no completion marker ({workdir.MARKER}): the step that builds it did not "
                              "finish its upload, or the prefix was deleted; run the factory again to rebuild it")
    return cache.fetch(client, url=url, data=data)


# --------------------------------------------------------------------------- small records


def record_location(rel: str) -> str:
    """Where the record *rel* (e.g. ``gpu-stage/runs/<id>.json``) lives: in the store, else the work dir."""
    root = remote.store_root()
    if root is None:
        return str(get_settings().resolved_work_dir / rel)
    return f"s3://{root.bucket}/{root.key(rel)}"


def write_record(rel: str, data: bytes) -> str:
    """Write the record *rel* where every host reads it (atomically: a reader never sees half); its location."""
    root = remote.store_root()
    if root is not None:
        return remote.put_record(root, rel, data)
    path = get_settings().resolved_work_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return str(path)


def read_record(rel: str) -> bytes | None:
    root = remote.store_root()
    if root is not None:
        return remote.get_record(root, rel)
    path = get_settings().resolved_work_dir / rel
    return path.read_bytes() if path.is_file() else None
