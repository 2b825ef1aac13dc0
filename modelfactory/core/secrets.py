"""The Hugging Face token used to publish: a Prefect ``Secret`` block, else ``HF_TOKEN``.

The token is returned to the caller only; it is never logged, written to a manifest or model
card, or stored in the catalog.
"""

from __future__ import annotations

from modelfactory.core.errors import PublishError
from modelfactory.core.settings import get_settings

SECRET_SETTING = "MODELFACTORY_HF_TOKEN_SECRET"


def _from_secret_block(name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except (ValueError, KeyError) as exc:  # Prefect raises ValueError for a missing block document
        raise PublishError(
            f"Prefect Secret block {name!r} (named by {SECRET_SETTING}) could not be loaded: create it "
            f"(Secret(value=...).save({name!r})) on the Prefect API this run uses, or unset {SECRET_SETTING} "
            "to use HF_TOKEN"
        ) from exc
    if not isinstance(value, str) or not value.strip():
        raise PublishError(f"Prefect Secret block {name!r} holds no token string: store the Hugging Face token in it")
    return value.strip()


def publish_token() -> str:
    """The token for Hub writes: the Secret block named by ``MODELFACTORY_HF_TOKEN_SECRET``, else
    ``HF_TOKEN`` (or the token saved by ``hf auth login``). Raises :class:`PublishError` if none."""
    name = get_settings().hf_token_secret
    if name:
        return _from_secret_block(name)
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError(
            "publishing to the Hugging Face Hub needs a write token: set HF_TOKEN, or store it in a Prefect "
            f"Secret block and set {SECRET_SETTING} to the block's name"
        )
    return token
