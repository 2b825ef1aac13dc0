"""Indexes for the 100k-run latency target: ls sorted by a gate ratio within a status or a base
model version, best's candidates from one covering index, ls --adapter from the index alone, and
run-id prefixes on PostgreSQL.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Frozen here (migrations must not import live code).
RATIOS = ("ppl_increase_pct", "decode_speedup", "size_ratio", "memory_ratio")
RUN_INDEXES = {
    **{f"ix_runs_status_{ratio}": ["status", ratio] for ratio in RATIOS},
    # (base_model_id, ppl_increase_pct) is the prefix of ix_runs_best
    **{f"ix_runs_base_model_id_{ratio}": ["base_model_id", ratio] for ratio in RATIOS[1:]},
    # best: candidates (base, ppl bound, passed) with every objective, newest-first ties, the id; status
    # after ppl so SQLite does not take it for `ls --base --status` newest first (see models.py).
    "ix_runs_best": ["base_model_id", "ppl_increase_pct", "status", *RATIOS[1:], "started_at", "id"],
}


def upgrade() -> None:
    for name, columns in RUN_INDEXES.items():
        op.create_index(name, "runs", columns)
    op.drop_index("ix_runs_base_model_id_status_ppl_increase_pct", "runs")  # a prefix of ix_runs_best
    op.create_index("ix_run_adapters_adapter_id_run_id", "run_adapters", ["adapter_id", "run_id"])
    op.drop_index("ix_run_adapters_adapter_id", "run_adapters")  # a prefix of the one above
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("ix_runs_id_pattern", "runs", ["id"], postgresql_ops={"id": "varchar_pattern_ops"})


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_runs_id_pattern", "runs")
    op.create_index("ix_run_adapters_adapter_id", "run_adapters", ["adapter_id"])
    op.drop_index("ix_run_adapters_adapter_id_run_id", "run_adapters")
    op.create_index("ix_runs_base_model_id_status_ppl_increase_pct", "runs",
                    ["base_model_id", "status", "ppl_increase_pct"])
    for name in RUN_INDEXES:
        op.drop_index(name, "runs")
