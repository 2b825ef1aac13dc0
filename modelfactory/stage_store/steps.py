"""Step outputs by URI: what the steps call (find / publish / share / resolve, and small records).

With no stage store configured every function keeps today's behaviour: a step output's URI is
its folder in the local work dir, and resolving a path returns it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelfactory.core import workdir
from modelfactory.core.errors import StageStoreError
from modelfactory.core.log import progress
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
    #: The output's ``_COMPLETE.json``: the step's own fields (e.g. the quantization time, the merge's
    #: logit difference) and its files (path, size, sha256).
    marker: dict[str, Any]
    #: The output's content digest (:func:`~modelfactory.core.manifest.content_digest` of its files):
    #: one step key has one output, and this is it, on every host.
    content: str
    #: True when this host built the key too but another host's output was stored first, so this
    #: host's copy was discarded and the stored one is the output (:func:`publish`).
    adopted: bool = False

    def folder(self) -> Path:
        """The output's files on this host (fetched into the cache when they were built elsewhere)."""
        return resolve(self.uri)


def configured() -> bool:
    """Whether step outputs move through a stage store (``MODELFACTORY_STAGE_STORE_URL``)."""
    return remote.store_root() is not None


def _output(step: str, key: str, uri: str, marker: dict[str, Any], *, adopted: bool = False) -> StepOutput:
    content = workdir.marker_content(marker)
    if content is None:
        raise StageStoreError(f"the {step} output {uri} has a completion marker ({workdir.MARKER}) that lists no "
                              "files (written by an older modelfactory): delete it so the step is built again")
    return StepOutput(step=step, key=key, uri=uri, marker=marker, content=content, adopted=adopted)


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
    return _output(step, key, str(url), remote.parse_marker(url, data))


def publish(step: str, key: str) -> StepOutput:
    """The complete local output ``<work_dir>/<step>/<key>``, uploaded to the stage store if one is set.

    One step key, one output everywhere: when the store already holds another output for the key
    (another host built it too and uploaded first: GPU kernels are not bit-reproducible), this
    host's copy is removed and the stored one is returned (``adopted``); every later read of the
    URI on this host fetches the stored files, checked by sha256 (:func:`resolve`).
    """
    folder = workdir.step_dir(step, key)
    marker = workdir.read_marker(folder)
    root = remote.store_root()
    if root is None:
        return _output(step, key, str(folder), marker)
    url = remote.output_url(root, step, key)
    stored = remote.parse_marker(url, remote.upload_output(root=root, step=step, key=key, folder=folder,
                                                           marker=marker))
    ours = workdir.marker_content(marker)
    theirs = _output(step, key, str(url), stored)
    if ours is not None and ours == theirs.content:
        return theirs
    progress(f"{step}: the stage store holds another build of key {key[:12]} (from {stored.get('host', '?')}, "
             f"content {theirs.content[:12]}; this host's: {(ours or '?')[:12]}): using the stored one, "
             "removing this host's copy")
    workdir.remove(step, key)
    return replace(theirs, adopted=True)


def discard(step: str, key: str) -> None:
    """Make the output of *step* for *key* no longer reusable on any host (a measurement to refresh,
    ``benchmark.reuse: false``, or a stored output found invalid): its local marker goes, and so do
    the store's marker and files. The next build of the key replaces it everywhere; hosts that
    fetched the old one keep it only under its old content digest, which nothing names any more."""
    workdir.discard(step, key)
    root = remote.store_root()
    if root is not None:
        remote.delete_output(root=root, step=step, key=key)


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
    work dir (when its copy is the stored one: same content) or shared folders, else from the cache
    (fetched and checked)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    url = S3Url.parse(uri)
    client = make_client()
    data = remote.read_marker(client, url)
    root = remote.store_root()
    if root is not None and (step_key := remote.step_of(root, url)) is not None:
        done = workdir.completed(*step_key)
        if done is not None and (data is None or _same_content(done, data, url)):
            return done
        if (folder := cache.linked(*step_key)) is not None:
            return folder
    if data is None:
        raise StageStoreError(f"{uri} has no completion marker ({workdir.MARKER}): the step that builds it did not "
                              "finish its upload, or the prefix was deleted; run the factory again to rebuild it")
    return cache.fetch(client, url=url, data=data)


def _same_content(folder: Path, data: bytes, url: S3Url) -> bool:
    return workdir.marker_content(workdir.read_marker(folder)) == workdir.marker_content(
        remote.parse_marker(url, data))


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
