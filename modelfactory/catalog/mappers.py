"""ORM rows → the plain records of :mod:`modelfactory.catalog.records` (datetimes always in UTC)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import selectinload

from modelfactory.catalog.models import Run, Watch, WebhookDelivery
from modelfactory.catalog.records import (
    ArtifactRecord,
    DeliveryRecord,
    MetricRecord,
    RunDetail,
    RunRow,
    StepRecord,
    WatchRecord,
)
from modelfactory.core.records import GateCheck, Publication

#: Loader options reading every child table of a run (for :func:`run_detail`) in one query each.
DETAIL_LOADS = [
    selectinload(Run.steps),
    selectinload(Run.metrics),
    selectinload(Run.gate_checks),
    selectinload(Run.artifacts),
    selectinload(Run.publications),
]
#: The columns of a :class:`RunRow` (select them, then map each result row with :func:`run_row`).
ROW_COLUMNS = (
    Run.id, Run.name, Run.status, Run.run_key, Run.base_uri, Run.base_sha, Run.started_at, Run.finished_at,
    Run.error, Run.config, Run.bits, Run.group_size, Run.desc_act, Run.adapters, Run.ppl_increase_pct,
    Run.decode_speedup, Run.size_ratio, Run.memory_ratio, Run.kld_mean, Run.top1_agreement_pct,
    Run.task_recovery_pct,
)


def aware(value: datetime | None) -> datetime | None:
    """*value* in UTC (SQLite hands back naive datetimes, which the catalog writes in UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def run_row(row: Any) -> RunRow:
    """A result row of :data:`ROW_COLUMNS` (or a :class:`Run`) as a :class:`RunRow`."""
    return RunRow(
        id=row.id, name=row.name, status=row.status, run_key=row.run_key, base_uri=row.base_uri,
        base_sha=row.base_sha, started_at=aware(row.started_at), finished_at=aware(row.finished_at),
        error=row.error, config=row.config, bits=row.bits, group_size=row.group_size, desc_act=row.desc_act,
        adapters=tuple(dict(a) for a in (row.adapters or [])), ppl_increase_pct=row.ppl_increase_pct,
        decode_speedup=row.decode_speedup, size_ratio=row.size_ratio, memory_ratio=row.memory_ratio,
        kld_mean=row.kld_mean, top1_agreement_pct=row.top1_agreement_pct, task_recovery_pct=row.task_recovery_pct,
    )


def run_detail(run: Run) -> RunDetail:
    """Everything about *run*, its children loaded (:data:`DETAIL_LOADS`)."""
    return RunDetail(
        id=run.id,
        name=run.name,
        status=run.status,
        run_key=run.run_key,
        base_uri=run.base_uri,
        base_sha=run.base_sha,
        started_at=aware(run.started_at),
        finished_at=aware(run.finished_at),
        error=run.error,
        config=run.config,
        spec=run.spec,
        adapters=run.adapters,
        library_versions=run.library_versions,
        host=run.host,
        error_kind=run.error_kind,
        steps=tuple(
            StepRecord(s.name, s.status, s.duration_s, s.output_uri, s.detail) for s in run.steps
        ),
        metrics=tuple(MetricRecord(m.name, m.side, m.value, m.unit) for m in run.metrics),
        gate_checks=tuple(
            GateCheck(metric=g.metric, threshold=g.threshold, baseline=g.baseline, candidate=g.candidate,
                      observed=g.observed, passed=g.passed, message=g.message)
            for g in run.gate_checks
        ),
        artifacts=tuple(
            ArtifactRecord(a.kind, a.uri, a.manifest_sha256, a.size_bytes) for a in run.artifacts
        ),
        publications=tuple(
            Publication(destination=p.destination, uri=p.uri, manifest_sha256=p.manifest_sha256,
                        size_bytes=p.size_bytes, revision=p.revision, commit=p.commit_sha,
                        reused=p.reused, content_sha256=p.content_sha256,
                        published_at=aware(p.published_at))
            for p in run.publications
        ),
    )


def watch_record(watch: Watch) -> WatchRecord:
    return WatchRecord(watch.repo, watch.kind, watch.base, watch.revision, dict(watch.spec or {}),
                       watch.last_sha, aware(watch.created_at), aware(watch.updated_at))


def delivery_record(delivery: WebhookDelivery) -> DeliveryRecord:
    return DeliveryRecord(delivery.repo, delivery.sha, delivery.event, delivery.status, delivery.delivery_id,
                          delivery.flow_run_id, delivery.detail, aware(delivery.received_at))
