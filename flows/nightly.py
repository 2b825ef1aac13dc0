"""The ``nightly`` flow: look for new commits of every watched repo and build those that changed.

For each watch: resolve the watched branch to its commit now (``HfApi.model_info``, which honours
``HF_ENDPOINT``), compare it with the watch's ``last_sha``, and for a new one start the
``on-finetune`` deployment (:func:`modelfactory.triggers.watch.start_build`: claimed once per commit, so a
commit the webhook already started is not built twice). Nothing changed: nothing runs. A watch
whose repo cannot be resolved does not stop the others; the flow run fails at the end, naming it.
Scheduled by ``deployments/prefect.yaml`` (cron); ``dry_run`` only reports.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, task
from pydantic import BaseModel, ConfigDict

from modelfactory.catalog import open_catalog
from modelfactory.core.errors import ModelFactoryError, TriggerError
from modelfactory.core.log import get_logger
from modelfactory.core.retries import retry_transient
from modelfactory.triggers.watch import resolve_head, start_build


class WatchCheck(BaseModel):
    """What the nightly check found and did for one watched repo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    revision: str
    last_sha: str | None
    head_sha: str | None
    action: Literal["unchanged", "started", "duplicate", "would-start", "error"]
    flow_run_id: str | None = None
    error: str | None = None


@task(name="resolve-head", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def resolve_head_task(repo: str, revision: str) -> str:
    return resolve_head(repo, revision)


@flow(name="watch-nightly", log_prints=True, validate_parameters=True)
def nightly(dry_run: bool = False) -> list[WatchCheck]:
    """Start a build for every watched repo whose branch moved since its last build."""
    logger = get_logger()
    catalog = open_catalog()
    checks: list[WatchCheck] = []
    for watch in catalog.list_watches():
        seen = {"repo": watch.repo, "revision": watch.revision, "last_sha": watch.last_sha}
        try:
            head = resolve_head_task(watch.repo, watch.revision)
            if head == watch.last_sha:
                checks.append(WatchCheck(**seen, head_sha=head, action="unchanged"))
            elif dry_run:
                checks.append(WatchCheck(**seen, head_sha=head, action="would-start"))
            else:
                started = start_build(repo=watch.repo, sha=head, event="nightly", catalog=catalog)
                checks.append(WatchCheck(**seen, head_sha=head, action=started.status,
                                         flow_run_id=started.flow_run_id))
        except ModelFactoryError as exc:
            logger.error(f"nightly: {watch.repo}@{watch.revision}: {exc.message}")
            checks.append(WatchCheck(**seen, head_sha=None, action="error", error=exc.message))
            continue
        check = checks[-1]
        logger.info(f"nightly: {watch.repo}@{watch.revision}: {check.action} "
                    f"({(watch.last_sha or 'never built')[:12]} -> {head[:12]})"
                    + (f", flow run {check.flow_run_id}" if check.flow_run_id else ""))
    failed = [c for c in checks if c.action == "error"]
    logger.info(f"nightly: {len(checks)} watched repo(s), {sum(c.action == 'started' for c in checks)} build(s) "
                f"started, {len(failed)} error(s)")
    if failed:
        raise TriggerError("nightly check could not check " + "; ".join(f"{c.repo}: {c.error}" for c in failed)
                           + ": fix these watches (modelfactory watch ls) or the Hub connection; the others ran")
    return checks
