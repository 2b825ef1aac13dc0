"""Credentials: loading them from Prefect ``Secret`` blocks, and keeping them out of text we write.

Values loaded here are returned to the caller only; they are never logged, written to a manifest
or model card, or stored in the catalog. Which block holds what is decided by the callers
(:mod:`modelfactory.hf.auth` for the Hugging Face token, :mod:`modelfactory.s3.client` for AWS keys).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from modelfactory.core.errors import ModelFactoryError

T = TypeVar("T")

_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@]+@")
_SIGNED_PARAM = re.compile(r"([?&](?:token|access_token|api_key|apikey|sig|signature|X-Amz-[A-Za-z\-]+)=)[^&\s)`'\"]+",
                           re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


def load_secret_block(*, name: str, setting: str, holds: str, fallback: str, parse: Callable[[Any], T | None],
                      error: type[ModelFactoryError]) -> T:
    """The value of the Prefect ``Secret`` block *name* (named by the environment variable *setting*).

    *parse* turns the stored value into what the caller needs, or ``None`` when it is not that;
    both a missing block and a value *parse* refuses raise *error*, saying the block must hold
    *holds* and that unsetting *setting* falls back to *fallback*. The value is never in a message.
    """
    from prefect.blocks.system import Secret

    hint = (f"store {holds} in Secret block {name!r} on the Prefect API this run uses, or unset {setting} "
            f"to use {fallback}")
    try:
        value = Secret.load(name).get()
    except (ValueError, KeyError) as exc:  # Prefect raises ValueError for a missing block document
        raise error(f"Prefect Secret block {name!r} could not be loaded (named by {setting}): {hint}") from exc
    parsed = parse(value)
    if parsed is None:
        raise error(f"Prefect Secret block {name!r} (named by {setting}) does not hold {holds}: {hint}")
    return parsed


def redact(text: str, *, secrets: Iterable[str] = ()) -> str:
    """*text* without credentials: URL user info, signed-URL parameters, Hugging Face tokens, *secrets*."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SIGNED_PARAM.sub(r"\1***", text)
    return _HF_TOKEN.sub("hf_***", text)
