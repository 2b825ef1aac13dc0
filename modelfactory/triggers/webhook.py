"""The Hugging Face webhook's decisions: who may deliver, and what a delivery does.

The HTTP route (``modelfactory/interfaces/server/hooks.py``) reads the body and maps the outcome to
a status code; everything else is here:

- the secret: ``MODELFACTORY_WEBHOOK_SECRET``, compared in constant time with ``X-Webhook-Secret``
  (:func:`secret_matches`); none configured: every delivery is refused, never accepted
  unauthenticated (:func:`webhook_secret`);
- the setup check ``modelfactory serve`` runs at start (:func:`check_webhook_setup`): a secret
  without a Prefect server is refused there, with the reason, rather than at the first delivery;
- a parsed payload → :class:`WebhookDecision` (:func:`handle_delivery`): ``ignored`` (not a model
  repo's content update, repo not watched, watched branch did not move), ``duplicate`` (this
  (repo, commit) was claimed before), or ``accepted`` (the build's flow run was created).

The Hub sends no delivery id, so a delivery is identified by what it asks for: (repo, commit).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from modelfactory.core.settings import get_settings
from modelfactory.triggers.build import require_prefect_server, start_build
from modelfactory.triggers.webhook_payload import HubWebhookPayload

if TYPE_CHECKING:
    from modelfactory.catalog.db import Catalog

#: ``ignored``: nothing to build; ``duplicate``: claimed before; ``accepted``: the build's run was created.
DeliveryOutcome = Literal["ignored", "duplicate", "accepted"]


class WebhookDecision(BaseModel):
    """What one authenticated, well-formed delivery led to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: DeliveryOutcome
    repo: str
    sha: str | None = None
    flow_run_id: str | None = None
    #: Why a delivery was ignored (said to the sender).
    reason: str | None = None

    def answer(self) -> dict[str, Any]:
        """The JSON the sender gets: the reason when ignored, else the commit and its flow run id."""
        if self.status == "ignored":
            return {"status": self.status, "reason": self.reason}
        return {"status": self.status, "repo": self.repo, "sha": self.sha, "flow_run_id": self.flow_run_id}


def webhook_secret() -> str | None:
    """The configured secret; ``None`` when unset or empty (the webhook then refuses every delivery)."""
    secret = get_settings().webhook_secret
    return secret.get_secret_value() if secret is not None and secret.get_secret_value() else None


def secret_matches(*, given: str | None, expected: str) -> bool:
    """Constant-time comparison; *given* may hold any bytes a client sent (latin-1 decoded)."""
    return hmac.compare_digest((given or "").encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def check_webhook_setup() -> bool:
    """``True``: the webhook can start builds; ``False``: no secret, it refuses deliveries (503).

    Raises :class:`~modelfactory.core.errors.NoPrefectServerError` when a secret is set but no
    Prefect server is configured.
    """
    if webhook_secret() is None:
        return False
    require_prefect_server(what="the webhook (MODELFACTORY_WEBHOOK_SECRET is set)",
                           otherwise="; or unset MODELFACTORY_WEBHOOK_SECRET to serve only the catalog API and pages")
    return True


def handle_delivery(*, payload: HubWebhookPayload, catalog: Catalog | None = None) -> WebhookDecision:
    """Ignore it, or start the build of the watched branch's new commit once (blocking: catalog, Prefect API)."""
    from modelfactory.catalog import open_catalog

    repo = payload.repo.name
    if not payload.is_content_update():
        return WebhookDecision(status="ignored", repo=repo, reason=(
            f"event {payload.event.scope}/{payload.event.action} is not a content update (repo.content/update)"))
    if payload.repo.type != "model":
        return WebhookDecision(status="ignored", repo=repo,
                               reason=f"{payload.repo.type} repos are not built, only model repos")
    if catalog is None:
        with open_catalog() as own:
            return handle_delivery(payload=payload, catalog=own)
    watch = catalog.get_watch(repo)
    if watch is None:
        return WebhookDecision(status="ignored", repo=repo,
                               reason="repo is not on the watch list (modelfactory watch add)")
    sha = payload.new_commit(branch=watch.revision)
    if sha is None:
        return WebhookDecision(status="ignored", repo=repo,
                               reason=f"branch {watch.revision!r} did not move to a new commit")
    started = start_build(repo=repo, sha=sha, event="webhook", catalog=catalog)
    status: DeliveryOutcome = "duplicate" if started.status == "duplicate" else "accepted"
    return WebhookDecision(status=status, repo=repo, sha=sha, flow_run_id=started.flow_run_id)
