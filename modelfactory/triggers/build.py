"""Starting the build of one commit of a watched repo, exactly once, on the Prefect server.

Both triggers, the Hugging Face webhook (:mod:`modelfactory.triggers.webhook`) and the nightly
check (:mod:`modelfactory.triggers.nightly`), go through :func:`start_build`: the catalog claims
``(repo, sha)`` once (atomic across processes, so retries, replays, bursts and a webhook racing the
nightly check start one build), then the ``on-finetune`` deployment gets a flow run (with the same
idempotency key on the Prefect side), and the watch remembers the SHA (``last_sha``).

Builds run on the Prefect server ``PREFECT_API_URL`` names (where ``modelfactory deploy`` put the
deployment and where the workers poll). Without one, Prefect would start a throwaway ephemeral
server in this process, with no deployment and no worker, that nobody stops: refused instead
(:func:`require_prefect_server`). ``docs/triggers.md`` has the why.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from modelfactory.core.errors import (
    ModelFactoryError,
    NoPrefectServerError,
    TriggerError,
)
from modelfactory.core.ids import check_commit_sha
from modelfactory.core.log import get_logger
from modelfactory.triggers.watch import TriggerEvent

if TYPE_CHECKING:
    from modelfactory.catalog.db import Catalog
    from modelfactory.catalog.records import DeliveryRecord

#: A claimed delivery whose run was never created (process died in between) is retried after this.
STALE_CLAIM = timedelta(minutes=2)
#: What :func:`start_build` did: created the build's flow run, or found the commit claimed before.
BuildStatus = Literal["started", "duplicate"]


class BuildStart(BaseModel):
    """What a trigger did for one commit: started a build, or found one already claimed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: BuildStatus
    repo: str
    sha: str
    flow_run_id: str | None
    event: TriggerEvent


def prefect_api_url() -> str | None:
    """The Prefect server this process talks to (``PREFECT_API_URL``, env or profile); ``None``: none."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def require_prefect_server(*, what: str, otherwise: str = "") -> str:
    """The Prefect API URL, or :class:`NoPrefectServerError` saying what *what* needs it for (and *otherwise*,
    another way out)."""
    from modelfactory.core.settings import get_settings

    url = prefect_api_url()
    if url is None:
        raise NoPrefectServerError(
            f"{what} needs a Prefect server, but PREFECT_API_URL is not set: builds are flow runs of "
            f"{get_settings().finetune_deployment!r} on the server `modelfactory deploy` ran against, where the "
            "cpu workers poll; set PREFECT_API_URL=http://<host>:4200/api (a throwaway ephemeral server would "
            f"have neither the deployment nor a worker){otherwise}")
    return url


def _worth_retrying(delivery: DeliveryRecord, *, repo: str, sha: str) -> bool:
    """A claim of this very commit whose run never got created (start failed, or the claimer died)."""
    if (delivery.repo, delivery.sha) != (repo, sha) or delivery.flow_run_id:
        return False
    if delivery.status == "failed":
        return True
    received = delivery.received_at
    return delivery.status == "accepted" and received is not None and datetime.now(UTC) - received > STALE_CLAIM


def create_finetune_run(*, repo: str, sha: str, event: TriggerEvent, deployment: str | None = None) -> str:
    """Create a flow run of the ``on-finetune`` deployment for *repo*@*sha*; its id.

    Returns as soon as the run exists (``run_deployment(timeout=0)``); inside a flow it is
    linked as a subflow. The idempotency key makes a second create for the same commit return
    the first run (Prefect's own dedup, behind the catalog claim).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from modelfactory.core.settings import get_settings

    deployment = deployment or get_settings().finetune_deployment
    server = require_prefect_server(what=f"starting the build of {repo}@{sha[:12]}")
    try:
        flow_run = run_deployment(deployment, parameters={"repo": repo, "sha": sha, "event": event}, timeout=0,
                                  idempotency_key=f"on-finetune:{repo}@{sha}", flow_run_name=f"{repo}@{sha[:12]}",
                                  tags=["modelfactory", f"trigger:{event}"])
    except ObjectNotFound as exc:
        raise TriggerError(
            f"deployment {deployment!r} (MODELFACTORY_FINETUNE_DEPLOYMENT) does not exist on the Prefect server "
            f"{server}: run `modelfactory deploy` against it") from exc
    except Exception as exc:  # noqa: BLE001 - server down, refused, timed out: all mean "no run"
        raise TriggerError(
            f"could not create a flow run of {deployment!r} for {repo}@{sha[:12]} on {server} "
            f"({type(exc).__name__}: {exc}); check that the Prefect server is up: the delivery can be retried"
        ) from exc
    return str(flow_run.id)


def start_build(*, repo: str, sha: str, event: TriggerEvent, delivery_id: str | None = None,
                catalog: Catalog | None = None) -> BuildStart:
    """Start the build of *repo*@*sha* once, whatever number of triggers ask for it.

    ``duplicate`` when the commit was claimed before (its flow run id, if it has one yet).
    Raises :class:`NoPrefectServerError` before claiming anything when no Prefect server is
    configured, and :class:`TriggerError` when the run cannot be created; the claim is then marked
    ``failed`` so that a retry (the Hub's, a replay, or the next nightly check) tries again.
    """
    from modelfactory.catalog import open_catalog

    check_commit_sha(sha)
    require_prefect_server(what=f"the {event} trigger of {repo}@{sha[:12]}")
    if catalog is None:
        with open_catalog() as own:
            return start_build(repo=repo, sha=sha, event=event, delivery_id=delivery_id, catalog=own)
    logger = get_logger()
    claimed, delivery = catalog.claim_delivery(repo=repo, sha=sha, event=event, delivery_id=delivery_id)
    if not claimed and not _worth_retrying(delivery, repo=repo, sha=sha):
        logger.info(f"{repo}@{sha[:12]} ({event}): already claimed by a {delivery.event} delivery "
                    f"({delivery.status}, flow run {delivery.flow_run_id or '-'}): nothing to start")
        return BuildStart(status="duplicate", repo=repo, sha=sha, flow_run_id=delivery.flow_run_id, event=event)
    try:
        flow_run_id = create_finetune_run(repo=repo, sha=sha, event=event)
    except TriggerError as exc:
        catalog.update_delivery(repo=repo, sha=sha, status="failed", detail=exc.message[:500])
        raise
    catalog.update_delivery(repo=repo, sha=sha, status="started", flow_run_id=flow_run_id)
    try:
        catalog.set_watch_sha(repo, sha)
    except ModelFactoryError as exc:  # the watch was removed meanwhile: the build still runs
        logger.warning(f"{repo}@{sha[:12]}: build started, but the watch could not be updated: {exc}")
    logger.info(f"{repo}@{sha[:12]} ({event}): started flow run {flow_run_id}")
    return BuildStart(status="started", repo=repo, sha=sha, flow_run_id=flow_run_id, event=event)
