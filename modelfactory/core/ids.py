"""Hugging Face Hub identifiers: repo ids and commit SHAs (one pattern and one checker each).

Specs (base and adapter URIs), Hub publishing, model cards, the watch list and webhook payloads
all check ids here, so they accept and refuse the same strings.
"""

from __future__ import annotations

import re

from modelfactory.core.errors import SpecError

#: ``owner/name`` as the Hub allows it (letters, digits, ``-``, ``_``, ``.``; 96 characters each);
#: :func:`is_hub_repo_id` also refuses ``--`` and ``..``, which the Hub rejects too.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
#: A full git commit id as the Hub reports it (40 lowercase hex characters).
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def is_hub_repo_id(value: str) -> bool:
    """Whether *value* is a Hub repo id ``owner/name`` (no ``hf://`` prefix)."""
    return bool(HUB_REPO_ID.match(value)) and "--" not in value and ".." not in value


def check_hub_repo_id(value: str, *, what: str, fix: str) -> str:
    """*value* when it is a Hub repo id, else :class:`SpecError` naming *what* it is and how to *fix* it."""
    if not is_hub_repo_id(value):
        raise SpecError(
            f"{what} {value!r} is not a Hugging Face repo id 'owner/name' (letters, digits, '-', '_', '.'; "
            f"no '--' or '..'): {fix}"
        )
    return value


def check_commit_sha(value: str) -> str:
    """*value* when it is a full commit SHA, else :class:`SpecError`."""
    if not COMMIT_SHA.match(value):
        raise SpecError(f"commit {value!r} is not a 40-character lowercase hex Git SHA: pass the full commit SHA")
    return value
