"""The ``on-finetune`` flow: build one new commit of a watched repo (webhook or nightly check).

Started by :func:`modelfactory.triggers.start_build` (``run_deployment`` on the ``on-finetune``
deployment, ``deployments/prefect.yaml``); it can also be run by hand from the Prefect UI with a
repo and a commit SHA. The build is the factory as its subflow, or the sweep when the watch's spec
fields list configurations (``grid`` or ``configs``: :func:`modelfactory.triggers.is_sweep`). Its
catalog id (the run's, or the sweep's) is this flow run's id, so the id the webhook answered with is
also the id to look up (``modelfactory catalog show ID``). A retry of this flow run keeps that id: the
factory starts the run again once its earlier attempt is over (``RunRecorder.start``), and so does the
sweep (``prepare_sweep_retry``).
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, runtime
from pydantic import Field

from modelfactory.core.records import RunOutcome
from modelfactory.core.sweep_spec import SweepSpec
from modelfactory.flows.factory import factory
from modelfactory.flows.sweep import sweep
from modelfactory.sweeps.outcome import SweepOutcome
from modelfactory.tasks.record import prepare_sweep_retry
from modelfactory.triggers import COMMIT_SHA, TriggerEvent, spec_for_watched_commit


@flow(name="on-finetune", log_prints=True, validate_parameters=True)
def on_finetune(
    repo: Annotated[str, Field(description="Watched Hub repo, owner/name (modelfactory watch ls).")],
    sha: Annotated[str, Field(pattern=COMMIT_SHA.pattern, description="Full 40-character commit SHA to build.")],
    event: Annotated[TriggerEvent, Field(description="What started this build: webhook, nightly or manual.")]
    = "manual",
) -> RunOutcome | SweepOutcome:
    """Build commit *sha* of watched repo *repo* with the watch's spec fields and gate: a factory run, or a sweep."""
    spec = spec_for_watched_commit(repo=repo, sha=sha, event=event)
    build_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    if isinstance(spec, SweepSpec):
        if build_id is not None:
            prepare_sweep_retry(sweep_id=build_id)
        return sweep(spec, sweep_id=build_id)
    return factory(spec, run_id=build_id)
