"""The watch list in action: the spec of a new commit, the commit a branch points at, starting its build.

A watch (a catalog ``watches`` row, managed with ``modelfactory watch``) names a Hub repo, the
branch followed (``revision``, default ``main``) and the spec fields of its runs (quantization,
benchmark, gate, publish):

- ``kind="adapter"``: a LoRA adapter repo; a new commit is merged into ``base`` and quantized;
- ``kind="base"``: a base model repo; a new commit is quantized as is.

Both triggers, the Hugging Face webhook (``modelfactory/interfaces/server/hooks.py``) and the nightly check
(``flows/nightly.py``), go through :func:`start_build`: the catalog claims ``(repo, sha)`` once
(atomic across processes, so retries, replays, bursts and a webhook racing the nightly check start
one build), then the ``on-finetune`` deployment gets a flow run (with the same idempotency key on
the Prefect side), and the watch remembers the SHA (``last_sha``). ``docs/triggers.md`` has the why.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from modelfactory.core.errors import ModelFactoryError, SpecError, TriggerError
from modelfactory.core.ids import COMMIT_SHA, check_commit_sha, check_hub_repo_id  # noqa: F401 (COMMIT_SHA: flows)
from modelfactory.core.log import get_logger
from modelfactory.core.specs import (
    FactorySpec,
    merge_overrides,
    parse_spec,
)

if TYPE_CHECKING:
    from modelfactory.catalog.db import Catalog
    from modelfactory.catalog.records import DeliveryRecord, WatchRecord

#: Spec fields that come from the watch itself, never from its stored spec.
WATCH_OWNED_FIELDS = ("base", "adapters")
#: A claimed delivery whose run was never created (process died in between) is retried after this.
STALE_CLAIM = timedelta(minutes=2)
#: Commit used to validate a watch's spec before any commit exists.
PLACEHOLDER_SHA = "0" * 40


def normalize_repo(repo: str) -> str:
    """``owner/name`` (an ``hf://`` prefix is dropped); :class:`SpecError` for anything else."""
    return check_hub_repo_id(repo.removeprefix("hf://"), what="watched repo", fix="fix the repo id")


def default_run_name(repo: str) -> str:
    """Run/artifact label for a watched repo: ``owner--name`` (the spec's ``name`` pattern)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", repo.replace("/", "--"))[:64]


def spec_data_for_commit(*, repo: str, kind: str, base: str | None, fields: dict[str, Any], sha: str) -> dict:
    """The raw spec of a build of *repo* at *sha*: the watch's *fields* plus the sources it names."""
    owned = [name for name in WATCH_OWNED_FIELDS if name in fields and name != "base"]
    if isinstance(fields.get("base"), dict) and "uri" in fields["base"]:
        owned.append("base.uri")  # base.revision may be set: the revision of the base an adapter uses
    if owned:
        raise SpecError(f"the spec of watch {repo!r} sets {', '.join(owned)}: sources come from the watch itself "
                        "(REPO and --base); drop these fields")
    data = merge_overrides({"name": default_run_name(repo)}, fields)
    if kind == "adapter":
        if not base:
            raise SpecError(f"adapter watch {repo!r} has no base model: add it again with --base BASE")
        data["base"] = merge_overrides(dict(fields.get("base") or {}), {"uri": base})
        data["adapters"] = [{"uri": f"hf://{repo}", "revision": sha}]
    elif kind == "base":
        data["base"] = {"uri": f"hf://{repo}", "revision": sha}
    else:
        raise SpecError(f"watch {repo!r} has kind {kind!r}: use 'adapter' or 'base'")
    return data


def spec_for_commit(watch: WatchRecord, sha: str) -> FactorySpec:
    """The :class:`FactorySpec` that builds commit *sha* of a watched repo."""
    data = spec_data_for_commit(repo=watch.repo, kind=watch.kind, base=watch.base, fields=watch.spec,
                                sha=check_commit_sha(sha))
    return parse_spec(data, origin=f"watch {watch.repo}")


def validate_watch(*, repo: str, kind: str, base: str | None, fields: dict[str, Any]) -> FactorySpec:
    """Check a watch before it is stored: its builds must have a valid spec."""
    data = spec_data_for_commit(repo=repo, kind=kind, base=base, fields=fields, sha=PLACEHOLDER_SHA)
    return parse_spec(data, origin=f"watch {repo}")


def resolve_head(repo: str, revision: str = "main") -> str:
    """The commit *revision* of Hub repo *repo* points at now (``HfApi.model_info``; honours ``HF_ENDPOINT``)."""
    from modelfactory.sources.hub import resolve_hub_revision

    return resolve_hub_revision(repo_id=repo, revision=revision)


# --------------------------------------------------------------------------- starting a build
class BuildStart(BaseModel):
    """What a trigger did for one commit: started a build, or found one already claimed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["started", "duplicate"]
    repo: str
    sha: str
    flow_run_id: str | None
    event: str


def _worth_retrying(delivery: DeliveryRecord, *, repo: str, sha: str) -> bool:
    """A claim of this very commit whose run never got created (start failed, or the claimer died)."""
    if (delivery.repo, delivery.sha) != (repo, sha) or delivery.flow_run_id:
        return False
    if delivery.status == "failed":
        return True
    received = delivery.received_at
    return delivery.status == "accepted" and received is not None and datetime.now(UTC) - received > STALE_CLAIM


def create_finetune_run(*, repo: str, sha: str, event: str, deployment: str | None = None) -> str:
    """Create a flow run of the ``on-finetune`` deployment for *repo*@*sha*; its id.

    Returns as soon as the run exists (``run_deployment(timeout=0)``); inside a flow it is
    linked as a subflow. The idempotency key makes a second create for the same commit return
    the first run (Prefect's own dedup, behind the catalog claim).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from modelfactory.core.settings import get_settings

    deployment = deployment or get_settings().finetune_deployment
    try:
        flow_run = run_deployment(deployment, parameters={"repo": repo, "sha": sha, "event": event}, timeout=0,
                                  idempotency_key=f"on-finetune:{repo}@{sha}", flow_run_name=f"{repo}@{sha[:12]}",
                                  tags=["modelfactory", f"trigger:{event}"])
    except ObjectNotFound as exc:
        raise TriggerError(
            f"deployment {deployment!r} (MODELFACTORY_FINETUNE_DEPLOYMENT) does not exist on the Prefect server "
            f"{PREFECT_API_URL.value() or '(ephemeral)'}: run `modelfactory deploy` against it") from exc
    except Exception as exc:  # noqa: BLE001 - server down, refused, timed out: all mean "no run"
        raise TriggerError(
            f"could not create a flow run of {deployment!r} for {repo}@{sha[:12]} on "
            f"{PREFECT_API_URL.value() or '(ephemeral Prefect)'} ({type(exc).__name__}: {exc}); "
            "check that the Prefect server is up: the delivery can be retried") from exc
    return str(flow_run.id)


def start_build(*, repo: str, sha: str, event: str, delivery_id: str | None = None,
                catalog: Catalog | None = None) -> BuildStart:
    """Start the build of *repo*@*sha* once, whatever number of triggers ask for it.

    ``duplicate`` when the commit was claimed before (its flow run id, if it has one yet).
    Raises :class:`TriggerError` when the run cannot be created; the claim is then marked
    ``failed`` so that a retry (the Hub's, a replay, or the next nightly check) tries again.
    """
    from modelfactory.catalog import open_catalog

    catalog = catalog or open_catalog()
    logger = get_logger()
    claimed, delivery = catalog.claim_delivery(repo=repo, sha=check_commit_sha(sha), event=event,
                                               delivery_id=delivery_id)
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
