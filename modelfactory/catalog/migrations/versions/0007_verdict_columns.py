"""The verdict's quality measures as run columns: KL divergence from fp16 (mean), top-1 agreement
with fp16 and task recovery (lowest over the lm-eval tasks), copied from the ``delta`` metrics of
the same names like 0003's ratios, so ls filters and sorts and best filters on plain indexed columns.
Indexes (status, column) and (base_model_id, column) for the sorts; ix_runs_best gains the three
columns after its 0004 columns (same prefix), so best stays index-only with the new filters.
Backfills the columns from recorded metrics.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Frozen here (migrations must not import live code).
RATIOS = ("ppl_increase_pct", "decode_speedup", "size_ratio", "memory_ratio")
COLUMNS = ("kld_mean", "top1_agreement_pct", "task_recovery_pct")
RUN_INDEXES = {
    **{f"ix_runs_status_{column}": ["status", column] for column in COLUMNS},
    **{f"ix_runs_base_model_id_{column}": ["base_model_id", column] for column in COLUMNS},
}
BEST_0004 = ["base_model_id", "ppl_increase_pct", "status", *RATIOS[1:], "started_at", "id"]
BEST_0007 = ["base_model_id", "ppl_increase_pct", "status", *RATIOS[1:], *COLUMNS, "started_at", "id"]


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for column in COLUMNS:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
    for column in COLUMNS:
        op.execute(
            f"UPDATE runs SET {column} = (SELECT m.value FROM metrics m WHERE m.run_id = runs.id "
            f"AND m.name = '{column}' AND m.side = 'delta')"
        )
    for name, columns in RUN_INDEXES.items():
        op.create_index(name, "runs", columns)
    op.drop_index("ix_runs_best", "runs")
    op.create_index("ix_runs_best", "runs", BEST_0007)


def downgrade() -> None:
    op.drop_index("ix_runs_best", "runs")
    op.create_index("ix_runs_best", "runs", BEST_0004)
    for name in RUN_INDEXES:
        op.drop_index(name, "runs")
    with op.batch_alter_table("runs") as batch:
        for column in COLUMNS:
            batch.drop_column(column)
