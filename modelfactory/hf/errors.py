"""huggingface_hub failures → the factory's errors, for reads (downloads) and writes (publishing).

Only outages are transient (:class:`HubUnavailableError`, retried by the steps): connection
failures and timeouts, HTTP 429 and 5xx, and 412 (the branch moved under a commit: a retry
re-reads it). Everything else is the user's to fix and fails at once: 401/403 (the token), 404,
other HTTP answers, and local file-system failures (the Hugging Face cache on a full disk →
:class:`DiskFullError`; permission denied, a read-only folder, ... → an error naming the path),
which would fail the same way on every retry.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelfactory.core.errors import (
    DiskFullError,
    HubUnavailableError,
    ModelFactoryError,
    PublishDiskFullError,
    PublishError,
    SourceError,
    SourceNotFoundError,
)
from modelfactory.core.secrets import redact

#: What a Hub call does: read (resolve, download) or write (publish).
HubAccess = Literal["read", "write"]
#: errno values of a write that ran out of space (a full disk, a quota, a file size limit).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
TOKEN_HINT = "check the token (HF_TOKEN, or the Prefect Secret block named by MODELFACTORY_HF_TOKEN_SECRET)"


@dataclass(frozen=True)
class _Rules:
    fatal: type[ModelFactoryError]
    not_found: type[ModelFactoryError]
    disk_full: type[DiskFullError]
    doing: str  # "downloading" / "publishing to"
    revision: str  # what the revision is called in messages


_RULES: dict[HubAccess, _Rules] = {
    "read": _Rules(SourceError, SourceNotFoundError, DiskFullError, "downloading", "revision"),
    "write": _Rules(PublishError, PublishError, PublishDiskFullError, "publishing to", "branch"),
}


def _first_line(exc: BaseException, secrets: list[str]) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0], secrets=secrets) if text else type(exc).__name__


def _local_path(exc: OSError, access: HubAccess) -> Path:
    """The path an OSError is about: its file name, else the folder the Hub client writes to."""
    if exc.filename:
        return Path(str(exc.filename))
    if access == "read":
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    import tempfile

    return Path(tempfile.gettempdir())  # publishing only writes temporary copies of manifests


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
        except OSError:
            continue
    return "free space unknown"


def _file_system_error(exc: OSError, *, access: HubAccess, where: str) -> ModelFactoryError:
    rules = _RULES[access]
    path = _local_path(exc, access)
    reason = exc.strerror or type(exc).__name__
    if exc.errno in DISK_FULL:
        move = ("free space there (`hf cache delete` removes old downloads) or point HF_HUB_CACHE (or HF_HOME) at "
                "a bigger disk" if access == "read" else "free space there or point TMPDIR at a bigger disk")
        return rules.disk_full(f"{rules.doing} {where} ran out of disk space under {path} ({reason}; "
                               f"{_free_space(path)}): {move}, then run again")
    # Downloads write into the Hugging Face cache; publishing reads the artifact's files.
    fix = ("let the user running the factory write it, or point HF_HUB_CACHE (or HF_HOME) at a folder it may "
           "write" if access == "read" else "let the user running the factory read it")
    if isinstance(exc, PermissionError):
        return rules.fatal(f"{rules.doing} {where} was denied access to {path} ({reason}): {fix}, then run again")
    return rules.fatal(f"{rules.doing} {where} failed on the local file system at {path} ({reason}): fix that "
                       "path, then run again")


@contextlib.contextmanager
def hub_errors(*, repo_id: str, revision: str | None, access: HubAccess, token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub, httpx and file-system failures inside the block into the factory's errors.

    *access* picks the error classes (reads: :class:`SourceError` / :class:`SourceNotFoundError`;
    writes: :class:`PublishError`); *token* (and any ``hf_`` token) never appears in a message.
    Errors of the factory's own hierarchy pass through unchanged.
    """
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    rules = _RULES[access]
    where = f"Hub repo {repo_id!r}" + (f" ({rules.revision} {revision!r})" if revision else "")
    if token is None:
        from huggingface_hub import get_token

        token = get_token()  # huggingface_hub sends it implicitly: keep it out of messages too
    secrets = [token] if token else []
    try:
        yield
    except ModelFactoryError:
        raise
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        detail = _first_line(exc, secrets)
        if status in (401, 403):
            need = (f"it must be valid and have write access to {repo_id.split('/')[0]!r}" if access == "write"
                    else "it must be valid and may read this repo")
            raise rules.fatal(f"the Hub refused access to {where} (HTTP {status}: {detail}): {TOKEN_HINT}; {need}"
                              ) from exc
        if status == 404:
            raise rules.not_found(f"{where} was not found on the Hub (HTTP 404: {detail}): check the repo id and "
                                  f"{rules.revision}") from exc
        if status == 412:
            raise HubUnavailableError(
                f"{where} moved while {rules.doing} it (another commit landed first); retrying re-checks the branch"
            ) from exc
        if status == 429 or status >= 500:
            raise HubUnavailableError(
                f"the Hub answered HTTP {status} for {where} ({detail}); retrying later may help"
            ) from exc
        raise rules.fatal(f"{rules.doing} {where} failed (HTTP {status}): {detail}") from exc
    except (httpx.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        # TransportError: connect/read/write failures and timeouts; LocalEntryNotFoundError: the Hub
        # could not be reached and the file is not cached; ConnectionError also covers offline mode.
        raise HubUnavailableError(
            f"could not reach the Hub for {where} ({_first_line(exc, secrets)}): check HF_ENDPOINT and the "
            "network; retrying may help"
        ) from exc
    except OSError as exc:  # the local disk, not the Hub: retrying would fail the same way
        raise _file_system_error(exc, access=access, where=where) from exc
    except ValueError as exc:  # e.g. the Hub rejected the model card's YAML metadata
        request = "the upload to" if access == "write" else "the request for"
        raise rules.fatal(f"the Hub rejected {request} {where}: {redact(str(exc), secrets=secrets)}") from exc
