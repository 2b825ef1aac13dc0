"""The ``on-finetune`` flow: build one new commit of a watched repo (webhook or nightly check).

Started by :func:`modelfactory.triggers.start_build` (``run_deployment`` on the ``on-finetune``
deployment, ``deployments/prefect.yaml``); it can also be run by hand from the Prefect UI with a
repo and a commit SHA. The factory runs as its subflow; its catalog run id is this flow run's id,
so the id the webhook answered with is also the id to look up (``modelfactory catalog show ID``).
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, runtime
from pydantic import Field

from modelfactory.flows.factory import factory
from modelfactory.core.records import RunOutcome
from modelfactory.triggers import COMMIT_SHA, TriggerEvent, spec_for_watched_commit


@flow(name="on-finetune", log_prints=True, validate_parameters=True)
def on_finetune(
    repo: Annotated[str, Field(description="Watched Hub repo, owner/name (modelfactory watch ls).")],
    sha: Annotated[str, Field(pattern=COMMIT_SHA.pattern, description="Full 40-character commit SHA to build.")],
    event: Annotated[TriggerEvent, Field(description="What started this build: webhook, nightly or manual.")]
    = "manual",
) -> RunOutcome:
    """Run the factory on commit *sha* of watched repo *repo*, with the watch's spec fields and gate."""
    spec = spec_for_watched_commit(repo=repo, sha=sha, event=event)
    run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    return factory(spec, run_id=run_id)
