"""Sweeps: a group of runs (one per quantization configuration) with an objective, a winner and a
Pareto front (``catalog/sweeps.py``). New tables only; no existing row changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("objective", sa.String(16), nullable=False),
        sa.Column("publish_mode", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("base_uri", sa.String(1024), nullable=True),
        sa.Column("base_sha", sa.String(128), nullable=True),
        sa.Column("base_model_id", sa.Integer(),
                  sa.ForeignKey("base_models.id", name="fk_sweeps_base_model_id_base_models", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
        sa.Column("finished_at", TZ_DATETIME, nullable=True),
        sa.Column("winner_run_id", sa.String(36),
                  sa.ForeignKey("runs.id", name="fk_sweeps_winner_run_id_runs", ondelete="SET NULL"), nullable=True),
        sa.Column("front", sa.JSON(), nullable=False),
        sa.Column("error_kind", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sweeps"),
    )
    op.create_index("ix_sweeps_status", "sweeps", ["status"])
    op.create_index("ix_sweeps_base_model_id", "sweeps", ["base_model_id"])
    op.create_index("ix_sweeps_created_at", "sweeps", ["created_at"])
    if op.get_bind().dialect.name == "postgresql":  # id prefixes, as ix_runs_id_pattern (0004)
        op.create_index("ix_sweeps_id_pattern", "sweeps", ["id"], postgresql_ops={"id": "varchar_pattern_ops"})

    op.create_table(
        "sweep_members",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sweep_id", sa.String(36),
                  sa.ForeignKey("sweeps.id", name="fk_sweep_members_sweep_id_sweeps", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("run_id", sa.String(36),
                  sa.ForeignKey("runs.id", name="fk_sweep_members_run_id_runs", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("kernel", sa.String(64), nullable=False),
        sa.Column("on_front", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sweep_members"),
        sa.UniqueConstraint("sweep_id", "run_id", name="uq_sweep_members_sweep_id_run_id"),
        sa.UniqueConstraint("sweep_id", "label", name="uq_sweep_members_sweep_id_label"),
    )
    op.create_index("ix_sweep_members_run_id", "sweep_members", ["run_id"])


def downgrade() -> None:
    op.drop_table("sweep_members")
    op.drop_table("sweeps")
