"""The triggers' state in the catalog: the watch list and the webhook deliveries it accepted.

A watch maps a Hub repo to the builds of its new commits (``modelfactory watch``); a delivery
claims one (repo, commit SHA) for one run, atomically across processes, so retried, replayed and
duplicate webhook deliveries start a single build.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from modelfactory.catalog.connections import CatalogConnections
from modelfactory.catalog.mappers import delivery_record, watch_record
from modelfactory.catalog.models import Watch, WebhookDelivery, utcnow
from modelfactory.catalog.records import (
    DELIVERY_STATUSES,
    WATCH_KINDS,
    DeliveryRecord,
    DeliveryStatus,
    WatchKind,
    WatchRecord,
    check_choice,
)
from modelfactory.core.errors import (
    CatalogError,
    CatalogNotFoundError,
    CatalogQueryError,
)


class CatalogWatches(CatalogConnections):
    """The watch list and the webhook deliveries of a catalog."""

    # ---------------------------------------------------------------- watch list

    def add_watch(
        self,
        *,
        repo: str,
        kind: WatchKind = "adapter",
        base: str | None = None,
        revision: str = "main",
        spec: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> WatchRecord:
        """Watch *repo* (an adapter repo on top of *base*, or a base model repo)."""
        check_choice("watch kind", kind, WATCH_KINDS)
        if kind == "adapter" and not base:
            raise CatalogQueryError(f"watching adapter repo {repo!r} needs its base model: give base=...")
        now = utcnow()
        row = {"repo": repo, "kind": kind, "base": base, "revision": revision, "spec": spec or {},
               "last_sha": None, "created_at": now, "updated_at": now}
        with self.writing(f"add watch {repo!r}") as session:
            existing = session.scalar(select(Watch).where(Watch.repo == repo))
            if existing is not None and not replace:
                raise CatalogQueryError(
                    f"{repo!r} is already on the watch list: remove it first "
                    f"(`modelfactory watch rm {repo}`) or replace it"
                )
            if existing is not None:
                session.delete(existing)
                session.flush()
            watch = Watch(**row)
            session.add(watch)
            session.flush()
            return watch_record(watch)

    def list_watches(self) -> list[WatchRecord]:
        with self.reading("list watches") as session:
            return [watch_record(w) for w in session.scalars(select(Watch).order_by(Watch.repo))]

    def get_watch(self, repo: str) -> WatchRecord | None:
        with self.reading(f"read watch {repo!r}") as session:
            watch = session.scalar(select(Watch).where(Watch.repo == repo))
            return watch_record(watch) if watch is not None else None

    def remove_watch(self, repo: str) -> bool:
        """Stop watching *repo*; ``False`` when it was not watched."""
        with self.writing(f"remove watch {repo!r}") as session:
            return session.execute(delete(Watch).where(Watch.repo == repo)).rowcount > 0

    def set_watch_sha(self, repo: str, sha: str) -> None:
        """Remember the commit of *repo* the factory last ran for."""
        with self.writing(f"update watch {repo!r}") as session:
            watch = session.scalar(select(Watch).where(Watch.repo == repo))
            if watch is None:
                raise CatalogNotFoundError(
                    f"{repo!r} is not on the watch list: add it with `modelfactory watch add`")
            watch.last_sha, watch.updated_at = sha, utcnow()

    # ---------------------------------------------------------------- webhook deliveries

    def claim_delivery(
        self, *, repo: str, sha: str, event: str, delivery_id: str | None = None
    ) -> tuple[bool, DeliveryRecord]:
        """Claim (repo, sha) for one run: ``(True, new)`` the first time, ``(False, existing)`` after.

        Atomic across processes (unique constraints), so retried and replayed deliveries, and a
        burst of identical ones, start one run. A delivery id seen before is a replay even for
        another SHA: ``(False, that delivery)``.
        """
        row = WebhookDelivery(repo=repo, sha=sha, event=event, status="accepted", delivery_id=delivery_id,
                              received_at=utcnow())
        try:
            with self.writing(f"claim delivery {repo}@{sha}") as session:
                session.add(row)
                session.flush()
                return True, delivery_record(row)
        except CatalogError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
        with self.reading(f"read delivery {repo}@{sha}") as session:
            same = (WebhookDelivery.repo == repo) & (WebhookDelivery.sha == sha)
            if delivery_id is not None:
                same = same | (WebhookDelivery.delivery_id == delivery_id)
            stmt = select(WebhookDelivery).where(same).limit(1)
            existing = session.scalar(stmt)
            assert existing is not None, "integrity error without a conflicting row"
            return False, delivery_record(existing)

    def update_delivery(
        self, *, repo: str, sha: str, status: DeliveryStatus, flow_run_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Record how the run of a claimed delivery went (started, or failed to start)."""
        check_choice("delivery status", status, DELIVERY_STATUSES)
        with self.writing(f"update delivery {repo}@{sha}") as session:
            delivery = session.scalar(
                select(WebhookDelivery).where(WebhookDelivery.repo == repo, WebhookDelivery.sha == sha)
            )
            if delivery is None:
                raise CatalogNotFoundError(f"no webhook delivery for {repo}@{sha}: claim it first")
            delivery.status, delivery.flow_run_id, delivery.detail = status, flow_run_id, detail

    def list_deliveries(self, *, repo: str | None = None, limit: int = 100) -> list[DeliveryRecord]:
        """Accepted deliveries, newest first (of *repo* only when given)."""
        stmt = select(WebhookDelivery).order_by(WebhookDelivery.received_at.desc()).limit(limit)
        if repo is not None:
            stmt = stmt.where(WebhookDelivery.repo == repo)
        with self.reading("list webhook deliveries") as session:
            return [delivery_record(d) for d in session.scalars(stmt)]
