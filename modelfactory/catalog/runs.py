"""Runs in the catalog: what a factory run records as it goes, and reading one back.

Every write is its own short transaction, so a crash mid-run leaves what was recorded so far.
Upserts are single ``INSERT ... ON CONFLICT`` statements on SQLite and PostgreSQL alike, so
several processes may record into one catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from modelfactory.catalog.connections import CatalogConnections
from modelfactory.catalog.ids import require_run, require_run_id, resolve_run_id
from modelfactory.catalog.models import (
    DELTA_COLUMNS,
    AdapterVersion,
    Artifact,
    BaseModelVersion,
    GateCheck,
    Metric,
    Publication,
    Run,
    RunAdapter,
    Step,
    utcnow,
)
from modelfactory.catalog.queries import RunFilter, query_runs, read_run
from modelfactory.catalog.records import (
    FINAL_RUN_STATUSES,
    METRIC_SIDES,
    PUBLICATION_DESTINATIONS,
    STEP_STATUSES,
    FinalRunStatus,
    MetricRecord,
    RunDetail,
    RunRow,
    RunStatus,
    StepStatus,
    check_choice,
)
from modelfactory.core import records as step_records
from modelfactory.core.errors import CatalogQueryError
from modelfactory.core.specs import QuantSpec


class CatalogRuns(CatalogConnections):
    """Record a run step by step (:meth:`start_run` … :meth:`finish_run`) and read it back."""

    # ---------------------------------------------------------------- writes

    def start_run(
        self,
        *,
        run_id: str,
        name: str,
        spec: dict[str, Any],
        run_key: str,
        flow_run_id: str | None = None,
        library_versions: dict[str, Any] | None = None,
        host: dict[str, Any] | None = None,
    ) -> None:
        """Record a new run in status ``running``, started now (UTC)."""
        run = Run(
            id=run_id,
            flow_run_id=flow_run_id,
            name=name,
            status="running",
            run_key=run_key,
            spec=spec,
            adapters=[],
            library_versions=library_versions or {},
            host=host or {},
            started_at=utcnow(),
            **quant_columns(spec),
        )
        with self.writing(f"start run {run_id!r}") as session:
            session.add(run)
            try:
                session.flush()
            except IntegrityError as exc:
                raise CatalogQueryError(
                    f"run id {run_id!r} already exists in the catalog at {self.url}: "
                    f"start every run with a fresh id (uuid4)"
                ) from exc

    def restart_run(self, *, run_id: str, flow_run_id: str | None = None,
                    library_versions: dict[str, Any] | None = None, host: dict[str, Any] | None = None) -> None:
        """Start run *run_id* again (a retry of its flow run): ``running``, its end and error cleared; the
        steps it recorded stay until the new attempt records them again. The caller checks that the earlier
        attempt is over (``RunRecorder.start``)."""
        with self.writing(f"restart run {run_id!r}") as session:
            run = require_run(session, run_id=run_id, catalog_url=self.url)
            run.status, run.finished_at, run.error, run.error_kind = "running", None, None, None
            run.flow_run_id = flow_run_id or run.flow_run_id
            run.library_versions = library_versions or run.library_versions
            run.host = host or run.host

    def set_sources(
        self, *, run_id: str, base_uri: str, base_sha: str, adapters: list[dict[str, Any]]
    ) -> None:
        """Record the resolved base model and adapters ({uri, sha, weight}) of a run."""
        with self.writing(f"set the sources of run {run_id!r}") as session:
            run = require_run(session, run_id=run_id, catalog_url=self.url)
            run.base_uri, run.base_sha = base_uri, base_sha
            run.adapters = [dict(adapter) for adapter in adapters]
            run.base_model_id = version_id(session, BaseModelVersion, uri=base_uri, sha=base_sha)
            session.execute(delete(RunAdapter).where(RunAdapter.run_id == run_id))
            session.add_all(
                RunAdapter(
                    run_id=run_id,
                    position=position,
                    adapter_id=version_id(session, AdapterVersion, uri=adapter["uri"], sha=adapter["sha"]),
                    weight=float(adapter.get("weight", 1.0)),
                )
                for position, adapter in enumerate(adapters)
            )

    def record_step(
        self,
        *,
        run_id: str,
        name: str,
        status: StepStatus,
        duration_s: float,
        output_uri: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record (or overwrite) the outcome of step *name* of a run."""
        check_choice("step status", status, STEP_STATUSES)
        row = {
            "run_id": run_id,
            "name": name,
            "status": status,
            "duration_s": float(duration_s),
            "output_uri": output_uri,
            "detail": detail,
            "recorded_at": utcnow(),
        }
        with self.writing(f"record step {name!r} of run {run_id!r}") as session:
            require_run_id(session, run_id=run_id, catalog_url=self.url)
            _upsert(session, Step, [row], keys=("run_id", "name"))

    def record_metrics(self, *, run_id: str, metrics: Sequence[MetricRecord]) -> None:
        """Record (or overwrite, per name and side) measured metrics of a run."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for metric in metrics:  # one row per key: a statement may not touch a row twice
            check_choice(f"side of metric {metric.name!r}", metric.side, METRIC_SIDES)
            rows[(metric.name, metric.side)] = {
                "run_id": run_id,
                "name": metric.name,
                "side": metric.side,
                "value": float(metric.value),
                "unit": metric.unit,
            }
        if not rows:
            return
        with self.writing(f"record metrics of run {run_id!r}") as session:
            require_run_id(session, run_id=run_id, catalog_url=self.url)
            _upsert(session, Metric, list(rows.values()), keys=("run_id", "name", "side"))
            ratios = {name: row["value"] for (name, side), row in rows.items()
                      if side == "delta" and name in DELTA_COLUMNS}
            if ratios:  # the denormalised copies ls / best sort and filter on
                session.execute(update(Run).where(Run.id == run_id).values(**ratios))

    def record_gate(self, *, run_id: str, checks: Sequence[step_records.GateCheck]) -> None:
        """Record the gate verdict of a run (the gate step's checks), replacing any previous one."""
        with self.writing(f"record the gate of run {run_id!r}") as session:
            require_run_id(session, run_id=run_id, catalog_url=self.url)
            session.execute(delete(GateCheck).where(GateCheck.run_id == run_id))
            session.add_all(GateCheck(run_id=run_id, **check.model_dump()) for check in checks)

    def record_artifact(
        self, *, run_id: str, kind: str, uri: str, manifest_sha256: str | None, size_bytes: int
    ) -> None:
        """Record a published artifact of a run."""
        artifact = Artifact(
            run_id=run_id,
            kind=kind,
            uri=uri,
            manifest_sha256=manifest_sha256,
            size_bytes=int(size_bytes),
            created_at=utcnow(),
        )
        with self.writing(f"record artifact {uri!r} of run {run_id!r}") as session:
            require_run_id(session, run_id=run_id, catalog_url=self.url)
            session.add(artifact)

    def record_publication(self, *, run_id: str, publication: step_records.Publication) -> None:
        """Record one destination a run's artifact was published to (at its ``published_at``, else now)."""
        check_choice("publication destination", publication.destination, PUBLICATION_DESTINATIONS)
        row = Publication(
            run_id=run_id,
            destination=publication.destination,
            uri=publication.uri,
            revision=publication.revision,
            commit_sha=publication.commit,
            manifest_sha256=publication.manifest_sha256,
            size_bytes=int(publication.size_bytes),
            reused=bool(publication.reused),
            content_sha256=publication.content_sha256,
            published_at=publication.published_at or utcnow(),
        )
        with self.writing(f"record publication {publication.uri!r} of run {run_id!r}") as session:
            require_run_id(session, run_id=run_id, catalog_url=self.url)
            session.add(row)

    def set_resolved_group_size(self, *, run_id: str, group_size: int) -> None:
        """Fill the config columns of a run whose spec said ``group_size: auto`` with the size its
        quantize step chose (an explicit size is left as recorded)."""
        with self.writing(f"record the group size of run {run_id!r}") as session:
            run = require_run(session, run_id=run_id, catalog_url=self.url)
            quant = parse_quant(run.spec or {})
            if quant is None or quant.group_size != "auto":
                return
            run.config, run.group_size = quant.resolved(group_size).label(), group_size

    def finish_run(
        self, *, run_id: str, status: FinalRunStatus, error: str | None = None, error_kind: str | None = None
    ) -> None:
        """Close a run with status passed, failed or rejected (finished now, UTC)."""
        check_choice("final run status", status, FINAL_RUN_STATUSES)
        with self.writing(f"finish run {run_id!r}") as session:
            run = require_run(session, run_id=run_id, catalog_url=self.url)
            run.status, run.finished_at = status, utcnow()
            run.error, run.error_kind = error, error_kind

    # ---------------------------------------------------------------- reads

    def get_run(self, run_id: str) -> RunDetail:
        """Everything about run *run_id* (a unique prefix of at least 6 characters will do)."""
        return read_run(self, run_id=run_id)

    def running_runs(self) -> list[tuple[str, str | None]]:
        """``(run id, flow run id)`` of every run still ``running``, oldest first (``catalog reconcile``)."""
        with self.reading("list the running runs") as session:
            return [(r.id, r.flow_run_id) for r in session.execute(
                select(Run.id, Run.flow_run_id).where(Run.status == "running").order_by(Run.started_at))]

    def resolve_id(self, session: Session, run_id: str) -> str:
        """The full id of run *run_id* (itself or a unique 6+ character prefix), else raise."""
        return resolve_run_id(session, run_id=run_id, catalog_url=self.url)

    def list_runs(
        self, *, status: RunStatus | None = None, base_sha: str | None = None, limit: int = 50
    ) -> list[RunRow]:
        """Runs newest first, optionally only those with *status* / built on *base_sha*.

        :func:`~modelfactory.catalog.queries.query_runs` with two of its filters and no upper
        bound on *limit*, for scripts and tests that read a whole catalog.
        """
        return query_runs(self, filters=RunFilter(status=status, base=base_sha), limit=limit, max_limit=None)


def parse_quant(spec: dict[str, Any]) -> QuantSpec | None:
    """The quantization settings of a recorded spec (defaults filled), ``None`` when they never validated."""
    try:
        return QuantSpec.model_validate(spec.get("quantize") or {})
    except ValidationError:
        return None


def quant_columns(spec: dict[str, Any]) -> dict[str, Any]:
    """The run columns derived from a spec's ``quantize`` part: its settings and label (``QuantSpec``).

    A spec that never validated (recorded as a ``failed`` run with the reason) has no configuration:
    the columns stay empty rather than the catalog refusing to record why the run failed.
    """
    quant = parse_quant(spec)
    if quant is None:
        return {"config": None, "bits": None, "group_size": None, "desc_act": None}
    if quant.group_size == "auto":  # known once the quantize step read the model (set_resolved_group_size)
        return {"config": None, "bits": quant.bits, "group_size": None, "desc_act": quant.desc_act}
    return {"config": quant.label(), "bits": quant.bits, "group_size": quant.group_size, "desc_act": quant.desc_act}


def _upsert(session: Session, model: type, rows: list[dict[str, Any]], *, keys: Sequence[str]) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` of every other column (SQLite and PostgreSQL)."""
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    stmt = insert(model).values(rows)
    updates = {column: stmt.excluded[column] for column in rows[0] if column not in keys}
    session.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates))


def version_id(session: Session, model: type, *, uri: str, sha: str) -> int:
    """Id of the (uri, sha) row of *model* (base model / adapter version), inserted if new."""
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    session.execute(
        insert(model).values(uri=uri, sha=sha, first_seen=utcnow()).on_conflict_do_nothing(
            index_elements=["uri", "sha"]
        )
    )
    found = session.scalar(select(model.id).where(model.uri == uri, model.sha == sha))
    assert found is not None
    return found
