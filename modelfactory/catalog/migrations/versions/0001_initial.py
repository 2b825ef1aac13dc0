"""Initial catalog schema: runs, steps, metrics, gate_checks, artifacts.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ_DATETIME = sa.DateTime(timezone=True)


def _run_fk(table: str) -> sa.Column:
    return sa.Column(
        "run_id",
        sa.String(36),
        sa.ForeignKey("runs.id", name=f"fk_{table}_run_id_runs", ondelete="CASCADE"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_key", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("base_uri", sa.String(1024), nullable=True),
        sa.Column("base_sha", sa.String(128), nullable=True),
        sa.Column("adapters", sa.JSON(), nullable=False),
        sa.Column("library_versions", sa.JSON(), nullable=False),
        sa.Column("host", sa.JSON(), nullable=False),
        sa.Column("started_at", TZ_DATETIME, nullable=False),
        sa.Column("finished_at", TZ_DATETIME, nullable=True),
        sa.Column("error_kind", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_run_key", "runs", ["run_key"])
    op.create_index("ix_runs_base_sha", "runs", ["base_sha"])
    op.create_index("ix_runs_started_at", "runs", ["started_at"])

    op.create_table(
        "steps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_fk("steps"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("output_uri", sa.String(1024), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("recorded_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_steps"),
        sa.UniqueConstraint("run_id", "name", name="uq_steps_run_id_name"),
    )
    op.create_index("ix_steps_run_id", "steps", ["run_id"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_fk("metrics"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.UniqueConstraint("run_id", "name", "side", name="uq_metrics_run_id_name_side"),
    )
    op.create_index("ix_metrics_run_id", "metrics", ["run_id"])
    op.create_index("ix_metrics_name_side", "metrics", ["name", "side"])

    op.create_table(
        "gate_checks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_fk("gate_checks"),
        sa.Column("metric", sa.String(100), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("baseline", sa.Float(), nullable=True),
        sa.Column("candidate", sa.Float(), nullable=True),
        sa.Column("observed", sa.Float(), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gate_checks"),
    )
    op.create_index("ix_gate_checks_run_id", "gate_checks", ["run_id"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_fk("artifacts"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
    )
    op.create_index("ix_artifacts_run_id", "artifacts", ["run_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints too.
    for table in ("artifacts", "gate_checks", "metrics", "steps", "runs"):
        op.drop_table(table)
