"""ORM tables of the catalog (SQLAlchemy 2 typed declarative).

Portable to SQLite and PostgreSQL: ``JSON`` columns, timezone-aware ``DateTime``,
string UUID keys. Any change here needs a new migration in ``migrations/versions``
(``tests/test_catalog.py`` checks that the migrations and these models agree).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from modelfactory.catalog.records import (
    DeliveryStatus,
    MetricSide,
    RunStatus,
    StepStatus,
    SweepStatus,
    WatchKind,
)

#: Deterministic constraint names, so migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: JSON whose Python ``None`` is SQL ``NULL`` (not the JSON literal ``null``).
NullableJSON = JSON(none_as_null=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


def created_on(obj: Any, dialect: str) -> bool:
    """Whether schema item *obj* exists on *dialect* (an index declared with
    ``.ddl_if(dialect=...)`` exists only there): the ``include_object`` filter of a
    models-vs-database comparison."""
    ddl_if = getattr(obj, "_ddl_if", None)
    if ddl_if is None or ddl_if.dialect is None:
        return True
    return dialect == ddl_if.dialect or (not isinstance(ddl_if.dialect, str) and dialect in ddl_if.dialect)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


#: The gate ratios denormalised onto runs (0003), perplexity increase first.
RATIO_COLUMNS = ("ppl_increase_pct", "decode_speedup", "size_ratio", "memory_ratio")
#: The verdict's quality measures denormalised onto runs (0007): KL divergence from fp16 (mean),
#: top-1 agreement with fp16 (%), task recovery (%, the lowest over the lm-eval tasks).
VERDICT_COLUMNS = ("kld_mean", "top1_agreement_pct", "task_recovery_pct")
#: Every run column kept in step with the ``delta`` metric of the same name (``record_metrics``).
DELTA_COLUMNS = RATIO_COLUMNS + VERDICT_COLUMNS


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # 0003: the query shapes of ls (filter, newest first) and best (base, passed, ppl bound).
        Index("ix_runs_status_started_at", "status", "started_at"),
        Index("ix_runs_base_model_id_started_at", "base_model_id", "started_at"),
        Index("ix_runs_config_started_at", "config", "started_at"),
        # 0004: ls sorted by a ratio, within a status or a base model version (read in order, stopped
        # at the limit); best's candidates read from the index alone: ix_runs_best replaces 0003's
        # (base_model_id, status, ppl_increase_pct) and serves (base_model_id, ppl_increase_pct) too.
        # status comes after the perplexity increase on purpose: with (base_model_id, status) first,
        # SQLite (with ANALYZE statistics) took it for `ls --base X --status S` newest first and
        # sorted every run of the base instead of walking (status, started_at) newest first.
        *(Index(f"ix_runs_status_{ratio}", "status", ratio) for ratio in RATIO_COLUMNS),
        *(Index(f"ix_runs_base_model_id_{ratio}", "base_model_id", ratio) for ratio in RATIO_COLUMNS[1:]),
        # 0007: the verdict columns, sorted within a status or a base model version like the ratios, and
        # in ix_runs_best (after the objectives, so its prefix and plans stay 0004's) so that best with
        # --max-kld / --min-top1 / --min-task-recovery still reads no table row.
        *(Index(f"ix_runs_status_{column}", "status", column) for column in VERDICT_COLUMNS),
        *(Index(f"ix_runs_base_model_id_{column}", "base_model_id", column) for column in VERDICT_COLUMNS),
        Index("ix_runs_best", "base_model_id", "ppl_increase_pct", "status", *RATIO_COLUMNS[1:], *VERDICT_COLUMNS,
              "started_at", "id"),
        # SQLite serves a prefix as a range on the primary key; PostgreSQL's LIKE 'p%' needs a
        # byte-order index whatever the database collation.
        Index("ix_runs_id_pattern", "id", postgresql_ops={"id": "varchar_pattern_ops"}).ddl_if(
            dialect="postgresql"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[RunStatus] = mapped_column(String(16), index=True)
    run_key: Mapped[str] = mapped_column(String(128), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_uri: Mapped[str | None] = mapped_column(String(1024))
    base_sha: Mapped[str | None] = mapped_column(String(128), index=True)
    adapters: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    library_versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    host: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), index=True, default=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_kind: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # Denormalised from the spec at start, so ls/best filter on plain indexed columns.
    config: Mapped[str | None] = mapped_column(String(64), index=True)  # e.g. gptq-4bit-128g
    bits: Mapped[int | None] = mapped_column(Integer)
    group_size: Mapped[int | None] = mapped_column(Integer)
    desc_act: Mapped[bool | None] = mapped_column(Boolean)
    base_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("base_models.id", ondelete="SET NULL"), index=True
    )
    # Denormalised from the run's ``delta`` metrics as they are recorded (0003), so ls can sort
    # and best can rank on plain indexed columns instead of pivoting the metrics table.
    ppl_increase_pct: Mapped[float | None] = mapped_column(Float)
    decode_speedup: Mapped[float | None] = mapped_column(Float)
    size_ratio: Mapped[float | None] = mapped_column(Float)
    memory_ratio: Mapped[float | None] = mapped_column(Float)
    # 0007, likewise from the ``delta`` metrics of the same names (VERDICT_COLUMNS).
    kld_mean: Mapped[float | None] = mapped_column(Float)
    top1_agreement_pct: Mapped[float | None] = mapped_column(Float)
    task_recovery_pct: Mapped[float | None] = mapped_column(Float)

    steps: Mapped[list[Step]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Step.id"
    )
    metrics: Mapped[list[Metric]] = relationship(
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by=lambda: [Metric.name, Metric.side],
    )
    gate_checks: Mapped[list[GateCheck]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="GateCheck.id"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Artifact.id"
    )
    publications: Mapped[list[Publication]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Publication.id"
    )
    adapter_links: Mapped[list[RunAdapter]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="RunAdapter.position"
    )


def _run_fk() -> Mapped[str]:
    """The ``run_id`` column every child table has."""
    return mapped_column(String(36), ForeignKey("runs.id", ondelete="CASCADE"), index=True)


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[StepStatus] = mapped_column(String(16))
    duration_s: Mapped[float] = mapped_column(Float)
    output_uri: Mapped[str | None] = mapped_column(String(1024))
    detail: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "name", "side"),
        Index("ix_metrics_name_side", "name", "side"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    name: Mapped[str] = mapped_column(String(100))
    side: Mapped[MetricSide] = mapped_column(String(8))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(32))


class GateCheck(Base):
    __tablename__ = "gate_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    metric: Mapped[str] = mapped_column(String(100))
    threshold: Mapped[float] = mapped_column(Float)
    baseline: Mapped[float | None] = mapped_column(Float)
    candidate: Mapped[float | None] = mapped_column(Float)
    observed: Mapped[float | None] = mapped_column(Float)
    passed: Mapped[bool] = mapped_column(Boolean)
    message: Mapped[str] = mapped_column(Text)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    kind: Mapped[str] = mapped_column(String(32))
    uri: Mapped[str] = mapped_column(String(1024), index=True)  # 0003: lineage by URI
    manifest_sha256: Mapped[str | None] = mapped_column(String(64), index=True)  # 0003: lineage by SHA
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # model files exceed 2 GiB
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BaseModelVersion(Base):
    """A base model at one commit (Hub repo id, local path, GGUF file or s3:// prefix + content SHA)."""

    __tablename__ = "base_models"
    __table_args__ = (UniqueConstraint("uri", "sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uri: Mapped[str] = mapped_column(String(1024), index=True)
    sha: Mapped[str] = mapped_column(String(128), index=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdapterVersion(Base):
    """A LoRA adapter at one commit."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("uri", "sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uri: Mapped[str] = mapped_column(String(1024), index=True)
    sha: Mapped[str] = mapped_column(String(128), index=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunAdapter(Base):
    """The adapters merged into a run's model, in merge order, with their weights."""

    __tablename__ = "run_adapters"
    __table_args__ = (
        UniqueConstraint("run_id", "position"),
        # 0004: ls --adapter reads the runs of an adapter version from the index alone.
        Index("ix_run_adapters_adapter_id_run_id", "adapter_id", "run_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    position: Mapped[int] = mapped_column(Integer)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="RESTRICT"))
    weight: Mapped[float] = mapped_column(Float)

    adapter: Mapped[AdapterVersion] = relationship(lazy="joined")


class Publication(Base):
    """One destination a run's artifact was published to (file://, s3:// or the Hub)."""

    __tablename__ = "publications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    destination: Mapped[str] = mapped_column(String(8))  # records.PUBLICATION_DESTINATIONS
    uri: Mapped[str] = mapped_column(String(1024), index=True)  # 0003: lineage by URI
    revision: Mapped[str | None] = mapped_column(String(255))
    commit_sha: Mapped[str | None] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    #: 0008: the content digest of the published files (the files the benchmark loaded); None before 0008.
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Watch(Base):
    """A repo whose new commits start the factory (nightly check and webhook)."""

    __tablename__ = "watches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repo: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[WatchKind] = mapped_column(String(8))
    base: Mapped[str | None] = mapped_column(String(1024))  # the base model of an adapter repo
    revision: Mapped[str] = mapped_column(String(255), default="main")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # spec fields for runs it starts
    last_sha: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """A webhook delivery that was accepted: one per (repo, sha), one per delivery id."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("repo", "sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    repo: Mapped[str] = mapped_column(String(255))
    sha: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    status: Mapped[DeliveryStatus] = mapped_column(String(16))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class RunClaim(Base):
    """A claim on a run key (0005): the run holding it builds, identical runs wait (``catalog/claims.py``).

    One row per key being built; a holder renews ``expires_at`` by a heartbeat, so the row of a
    holder that died is taken over once it expired.
    """

    __tablename__ = "run_claims"

    run_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))  # "host pid N run <id>": who builds
    token: Mapped[str] = mapped_column(String(32))  # this claim (a takeover gets a new one)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    renewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Sweep(Base):
    """A sweep (0006): many quantization configurations of one merged model, each an ordinary run
    (:class:`SweepMember`), the winner chosen by the objective among the passing ones."""

    __tablename__ = "sweeps"
    __table_args__ = (
        # As for runs: id prefixes on PostgreSQL need a byte-order index (see Run).
        Index("ix_sweeps_id_pattern", "id", postgresql_ops={"id": "varchar_pattern_ops"}).ddl_if(
            dialect="postgresql"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    objective: Mapped[str] = mapped_column(String(16))  # core.sweep_spec.Objective
    publish_mode: Mapped[str] = mapped_column(String(16))  # core.sweep_spec.PublishMode
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[SweepStatus] = mapped_column(String(16), index=True)
    base_uri: Mapped[str | None] = mapped_column(String(1024))
    base_sha: Mapped[str | None] = mapped_column(String(128))
    base_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("base_models.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    winner_run_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("runs.id", ondelete="SET NULL"))
    front: Mapped[list[str]] = mapped_column(JSON)  # run ids on the Pareto front
    error_kind: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)

    members: Mapped[list[SweepMember]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by=lambda: [SweepMember.position, SweepMember.id]
    )


class SweepMember(Base):
    """One configuration of a sweep: the run that built, benchmarked and gated it, and its label."""

    __tablename__ = "sweep_members"
    __table_args__ = (UniqueConstraint("sweep_id", "run_id"), UniqueConstraint("sweep_id", "label"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(String(36), ForeignKey("sweeps.id", ondelete="CASCADE"))
    run_id: Mapped[str] = _run_fk()  # a run's sweeps
    position: Mapped[int] = mapped_column(Integer)  # declaration order in the sweep spec
    label: Mapped[str] = mapped_column(String(128))  # also the Hub branch it publishes to
    kernel: Mapped[str] = mapped_column(String(64))
    on_front: Mapped[bool] = mapped_column(Boolean, default=False)
