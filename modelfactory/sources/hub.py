"""Hugging Face Hub sources: a repo id and revision resolved to a commit SHA, that commit downloaded.

Failures are mapped by :func:`modelfactory.hf.hub_errors`: only outages (no connection, timeouts,
429, 5xx) are transient; 401/403, 404 and local disk problems are the user's to fix.
"""

from __future__ import annotations

from pathlib import Path

from modelfactory.core.errors import SourceError, SourceNotFoundError, SpecError
from modelfactory.hf import hub_errors, hub_token

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_hub_revision(*, repo_id: str, revision: str | None) -> str:
    """The commit SHA that *revision* (default: main) of *repo_id* points at."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with hub_errors(repo_id=repo_id, revision=revision, access="read"):
        try:
            info = HfApi(token=hub_token(access="read")).model_info(repo_id, revision=revision)
        except RevisionNotFoundError as exc:
            raise SourceNotFoundError(
                f"revision {revision!r} of Hub repo {repo_id!r} does not exist: use an existing branch, tag or commit"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise SourceNotFoundError(
                f"Hub repo {repo_id!r} does not exist or is private: check the id, or set HF_TOKEN for private repos"
            ) from exc
        except HFValidationError as exc:
            raise SpecError(f"malformed Hugging Face repo id {repo_id!r}: {exc}") from exc
    if not info.sha:
        raise SourceError(f"the Hub returned no commit SHA for {repo_id!r}@{revision}: try an explicit revision")
    return info.sha


def download_hub(*, repo_id: str, sha: str) -> Path:
    """The local folder (in the Hugging Face cache) holding the model files of commit *sha* of *repo_id*."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id=repo_id, revision=sha, access="read"):
        return Path(snapshot_download(repo_id, revision=sha, allow_patterns=MODEL_PATTERNS,
                                      token=hub_token(access="read")))
