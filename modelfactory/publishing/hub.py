"""Publish a passing artifact to a Hugging Face Hub model repo: one branch per quantization config.

``hf://owner/repo`` → the repo is created if missing (private on request), the branch (default:
the quantization label such as ``gptq-4bit-128g``) is created from ``main`` if missing, and the
weights, config, tokenizer, ``README.md`` model card and ``manifest.json`` land in **one commit**
(``HfApi.create_commit`` with ``parent_commit`` = the branch head, so a concurrent writer makes it
fail instead of interleaving). Files on the branch that are not part of the artifact are deleted
in that same commit (``.gitattributes`` stays).

``HfApi.upload_folder`` is not used on purpose: with ``hf_xet`` installed (the default) it runs
huggingface_hub's streamed pipeline, which commits in batches (every 256 files or 5 minutes), so a
large model could appear on the branch in several commits with ``manifest.json`` before its
weights. ``create_commit`` uploads the same way (Xet, or LFS) and always makes one commit.

Re-publishing an identical artifact (the branch head's ``manifest.json`` equals the new one apart
from ``created_at``) is a no-op: ``reused=True`` and the existing commit.

The endpoint is huggingface_hub's (``HF_ENDPOINT``, read when huggingface_hub is imported); the
token and the error mapping are :mod:`modelfactory.hf`'s; the token is never logged or written anywhere.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfactory.core.errors import PublishError
from modelfactory.core.ids import check_hub_repo_id
from modelfactory.core.log import progress
from modelfactory.core.manifest import MANIFEST, manifest_bytes, manifest_digest
from modelfactory.core.records import Publication
from modelfactory.hf import hub_errors, hub_token
from modelfactory.publishing.modelcard import render_card

if TYPE_CHECKING:
    from huggingface_hub import HfApi

CARD = "README.md"
#: Paths on a branch that are kept although they are not part of the artifact.
KEEP = {".gitattributes"}
#: Manifest keys that differ between two publications of the same artifact.
VOLATILE = ("created_at",)


# --------------------------------------------------------------------------- steps
def ensure_repo(api: HfApi, *, repo_id: str, private: bool) -> None:
    """Create *repo_id* if missing; refuse to publish a private-requested model into a public repo."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.model_info(repo_id)
    if private and info.private is False:
        raise PublishError(
            f"Hub repo {repo_id!r} already exists and is public, but publish.private is true: make the repo "
            "private on the Hub first, or set publish.private: false"
        )


def branch_head(api: HfApi, *, repo_id: str, branch: str) -> str | None:
    refs = api.list_repo_refs(repo_id)
    return next((b.target_commit for b in refs.branches if b.name == branch), None)


def ensure_branch(api: HfApi, *, repo_id: str, branch: str) -> str:
    """The head commit of *branch*, creating the branch from ``main`` first if it does not exist."""
    head = branch_head(api, repo_id=repo_id, branch=branch)
    if head is None:
        progress(f"publish: creating branch {branch!r} in {repo_id}")
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = branch_head(api, repo_id=repo_id, branch=branch)
    if head is None:
        raise PublishError(f"branch {branch!r} of Hub repo {repo_id!r} was created but is not listed: retry publishing")
    return head


def branch_manifest(api: HfApi, *, repo_id: str, commit: str) -> bytes | None:
    """``manifest.json`` at *commit*, or None when the branch holds no artifact yet."""
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory(prefix="mf-hub-") as tmp:
        try:
            path = api.hf_hub_download(repo_id, MANIFEST, revision=commit, cache_dir=tmp)
        except EntryNotFoundError:
            return None
        return Path(path).read_bytes()


def same_artifact(*, existing: bytes, manifest: dict[str, Any]) -> bool:
    """True when *existing* describes the same artifact as *manifest* (ignoring ``created_at``)."""
    try:
        old = json.loads(existing)
    except ValueError:
        return False
    new = json.loads(manifest_bytes(manifest))
    strip = lambda m: {k: v for k, v in m.items() if k not in VOLATILE}  # noqa: E731
    return isinstance(old, dict) and strip(old) == strip(new)


def commit_operations(api: HfApi, *, source: Path, repo_id: str, head: str, manifest: dict[str, Any],
                      card: str) -> list:
    """Adds for every manifest file + README.md + manifest.json (last), deletes for stale branch files."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    paths = [entry["path"] for entry in manifest["files"]]
    if CARD in paths or MANIFEST in paths:
        raise PublishError(f"{source} contains {CARD} or {MANIFEST} itself: the factory writes those; remove it")
    adds = []
    for entry in manifest["files"]:
        file = source / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["size"]:
            raise PublishError(f"{file} is missing or changed since its manifest was built: publish again")
        adds.append(CommitOperationAdd(path_in_repo=entry["path"], path_or_fileobj=file))
    adds.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    adds.append(CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=manifest_bytes(manifest)))
    wanted = {op.path_in_repo for op in adds} | KEEP
    stale = [f.path for f in api.list_repo_tree(repo_id, revision=head, recursive=True)
             if isinstance(f, RepoFile) and f.path not in wanted]
    return [CommitOperationDelete(path_in_repo=p) for p in stale] + adds


def _commit_text(manifest: dict[str, Any]) -> tuple[str, str]:
    ratios = (manifest.get("metrics") or {}).get("ratios") or {}
    shown = ", ".join(f"{k} {v:.3g}" for k, v in ratios.items() if isinstance(v, (int, float)))
    title = f"modelfactory: {manifest.get('name')} {manifest.get('config')} ({str(manifest.get('key'))[:12]})"
    gate = "passed" if (manifest.get("gate") or {}).get("passed") else "rejected"
    return title, f"Gate {gate}. {shown}. Files and sha256 in manifest.json."


def _card_matrix(matrix_markdown: str | None) -> dict[str, str]:
    """The sweep matrix as ``render_card``'s keyword, when the card renders one.

    Why the check: the card's matrix section (``render_card(matrix_markdown=...)``) lands separately
    from the sweep flow; until then a sweep publishes its cards without the matrix, not fails.
    """
    if matrix_markdown is None:
        return {}
    if "matrix_markdown" not in inspect.signature(render_card).parameters:
        progress("publish: this model card has no sweep-matrix section yet; publishing the card without it")
        return {}
    return {"matrix_markdown": matrix_markdown}


# --------------------------------------------------------------------------- entry point
def publish_hub(*, source: Path, repo_id: str, revision: str, private: bool, manifest: dict,
                matrix_markdown: str | None = None) -> Publication:
    """Push *source* (+ model card + manifest) to branch *revision* of Hub repo *repo_id* in one commit.

    *matrix_markdown*: a sweep's matrix of every configuration, for the card (``flows/sweep.py``)."""
    from huggingface_hub import HfApi

    check_hub_repo_id(repo_id, what="the Hub repo of the publish destination", fix="use hf://owner/name")
    token = hub_token(access="write")
    api = HfApi(token=token)
    uri = f"{api.endpoint}/{repo_id}/tree/{revision}"
    with hub_errors(repo_id=repo_id, revision=revision, access="write", token=token):
        ensure_repo(api, repo_id=repo_id, private=private)
        head = ensure_branch(api, repo_id=repo_id, branch=revision)
        existing = branch_manifest(api, repo_id=repo_id, commit=head)
        if existing is not None and same_artifact(existing=existing, manifest=manifest):
            progress(f"publish: {repo_id}@{revision} already holds this artifact (commit {head[:12]}); nothing pushed")
            return Publication(uri=uri, manifest_sha256=manifest_digest(existing), size_bytes=manifest["total_bytes"],
                               reused=True, destination="hub", revision=revision, commit=head)
        card = render_card(manifest=manifest, repo_id=repo_id, revision=revision, secrets=[token],
                           **_card_matrix(matrix_markdown))
        operations = commit_operations(api, source=source, repo_id=repo_id, head=head, manifest=manifest, card=card)
        title, description = _commit_text(manifest)
        progress(f"publish: pushing {len(manifest['files'])} files + model card, "
                 f"{manifest['total_bytes'] / 1e6:.1f} MB, to {repo_id}@{revision}")
        info = api.create_commit(repo_id, operations=operations, commit_message=title,
                                 commit_description=description, revision=revision, parent_commit=head)
    progress(f"publish: {repo_id}@{revision} is commit {info.oid}")
    return Publication(uri=uri, manifest_sha256=manifest_digest(manifest_bytes(manifest)),
                       size_bytes=manifest["total_bytes"], reused=False, destination="hub", revision=revision,
                       commit=info.oid)
