"""The Hugging Face token, for reads (downloads) and writes (publishing) alike.

The Prefect ``Secret`` block named by ``MODELFACTORY_HF_TOKEN_SECRET`` when that is set, else
``HF_TOKEN`` / the token saved by ``hf auth login``. The token is returned to the caller only; it
is never logged, written to a manifest or model card, or stored in the catalog.
"""

from __future__ import annotations

from typing import Any

from modelfactory.core.errors import PublishError, SourceError
from modelfactory.core.secrets import load_secret_block
from modelfactory.core.settings import get_settings
from modelfactory.hf.errors import HubAccess

SECRET_SETTING = "MODELFACTORY_HF_TOKEN_SECRET"


def _token_string(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def hub_token(*, access: HubAccess) -> str | None:
    """The token to send to the Hub for *access*.

    With ``MODELFACTORY_HF_TOKEN_SECRET`` set: the token in that Secret block (a missing or empty
    block is a :class:`SourceError` for reads, a :class:`PublishError` for writes). Otherwise, for
    writes, ``HF_TOKEN`` / the saved login, and a :class:`PublishError` when there is none; for
    reads ``None``: huggingface_hub then sends ``HF_TOKEN`` / the saved login itself (honouring
    ``HF_HUB_DISABLE_IMPLICIT_TOKEN``), or nothing, which is enough for public repos.
    """
    name = get_settings().hf_token_secret
    if name:
        return load_secret_block(name=name, setting=SECRET_SETTING, holds="the Hugging Face token (a string)",
                                 fallback="HF_TOKEN", parse=_token_string,
                                 error=PublishError if access == "write" else SourceError)
    if access == "read":
        return None
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError(
            "publishing to the Hugging Face Hub needs a write token: set HF_TOKEN, or store it in a Prefect "
            f"Secret block and set {SECRET_SETTING} to the block's name"
        )
    return token
