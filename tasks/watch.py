"""Nightly step — resolve a watched branch: the commit it points at on the Hub now.

Retried for transient Hub errors (5xx, 429, network); a repo that is gone or private fails at
once. What the nightly check does with the commit is :mod:`modelfactory.triggers.nightly`.
"""

from __future__ import annotations

from prefect import task

from modelfactory.core.retries import retry_transient
from modelfactory.sources.hub import resolve_hub_revision


def resolve_head(*, repo: str, revision: str = "main") -> str:
    """The commit *revision* of Hub repo *repo* points at now (``HfApi.model_info``; honours ``HF_ENDPOINT``)."""
    return resolve_hub_revision(repo_id=repo, revision=revision)


@task(name="resolve-head", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def resolve_head_task(repo: str, revision: str) -> str:
    return resolve_head(repo=repo, revision=revision)
