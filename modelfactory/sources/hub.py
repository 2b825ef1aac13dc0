"""Hugging Face Hub sources: a repo id and revision resolved to a commit SHA, that commit downloaded.

Only outages (429, 5xx, no connection) are transient; 401/403 and 404 are the user's to fix.
"""

from __future__ import annotations

from pathlib import Path

from modelfactory.core.errors import (
    HubUnavailableError,
    SourceError,
    SourceNotFoundError,
    SpecError,
)

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_token() -> str | None:
    """The token for Hub reads: the Secret block named by ``MODELFACTORY_HF_TOKEN_SECRET``, else
    ``HF_TOKEN`` / the saved login (``None``: anonymous, enough for public repos)."""
    from modelfactory.core.settings import get_settings

    if get_settings().hf_token_secret:
        from modelfactory.core.secrets import publish_token

        return publish_token()
    return None  # huggingface_hub falls back to HF_TOKEN / the saved login itself


def _hub_failure(exc: Exception, *, what: str) -> Exception:
    """Map a huggingface_hub failure to the factory's errors: only outages are transient."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status in (401, 403):
        return SourceError(
            f"the Hub refused access to {what} ({status}: {reason}): check the token (HF_TOKEN or the "
            f"Secret block named by MODELFACTORY_HF_TOKEN_SECRET) and that it may read this repo"
        )
    if status == 404:
        return SourceNotFoundError(f"{what} was not found on the Hub ({reason}): check the repo id and revision")
    if status is None or status == 429 or status >= 500:
        return HubUnavailableError(f"could not reach the Hub for {what} ({reason}); retrying may help")
    return SourceError(f"the Hub answered {status} for {what} ({reason})")


def resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit SHA that *revision* (default: main) of *repo_id* points at."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi(token=hub_token()).model_info(repo_id, revision=revision)
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
    except OSError as exc:  # HTTP errors and connection errors
        raise _hub_failure(exc, what=f"{repo_id!r}") from exc
    if not info.sha:
        raise SourceError(f"the Hub returned no commit SHA for {repo_id!r}@{revision}: try an explicit revision")
    return info.sha


def download_hub(repo_id: str, sha: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=sha, allow_patterns=MODEL_PATTERNS, token=hub_token()))
    except OSError as exc:
        raise _hub_failure(exc, what=f"{repo_id}@{sha[:12]}") from exc
