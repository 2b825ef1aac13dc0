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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
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


def _run_fk() -> Mapped[str]:
    """The ``run_id`` column every child table has."""
    return mapped_column(String(36), ForeignKey("runs.id", ondelete="CASCADE"), index=True)


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
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
    side: Mapped[str] = mapped_column(String(8))
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
    uri: Mapped[str] = mapped_column(String(1024))
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # model files exceed 2 GiB
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
