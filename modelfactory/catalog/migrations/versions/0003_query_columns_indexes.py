"""Query columns and indexes: the four gate ratios on runs, composite indexes for ls / best,
artifact and publication lookups for lineage; backfills ratios and base model rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The ``delta`` metrics copied onto runs (frozen here: migrations must not import live code).
RATIOS = ("ppl_increase_pct", "decode_speedup", "size_ratio", "memory_ratio")
RUN_INDEXES = {
    "ix_runs_status_started_at": ["status", "started_at"],
    "ix_runs_base_model_id_started_at": ["base_model_id", "started_at"],
    "ix_runs_config_started_at": ["config", "started_at"],
    "ix_runs_base_model_id_status_ppl_increase_pct": ["base_model_id", "status", "ppl_increase_pct"],
}


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for column in RATIOS:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
    for name, columns in RUN_INDEXES.items():
        op.create_index(name, "runs", columns)
    op.create_index("ix_artifacts_uri", "artifacts", ["uri"])
    op.create_index("ix_artifacts_manifest_sha256", "artifacts", ["manifest_sha256"])
    op.create_index("ix_publications_uri", "publications", ["uri"])
    _backfill_ratios()
    _backfill_sources()


def _backfill_ratios() -> None:
    for column in RATIOS:
        op.execute(
            f"UPDATE runs SET {column} = (SELECT m.value FROM metrics m WHERE m.run_id = runs.id "
            f"AND m.name = '{column}' AND m.side = 'delta')"
        )


def _backfill_sources() -> None:
    """Base model / adapter rows and links for runs recorded before 0002 (from their JSON columns)."""
    bind = op.get_bind()
    meta = sa.MetaData()
    runs = sa.Table("runs", meta, autoload_with=bind)
    base_models = sa.Table("base_models", meta, autoload_with=bind)
    adapters = sa.Table("adapters", meta, autoload_with=bind)
    run_adapters = sa.Table("run_adapters", meta, autoload_with=bind)
    now = datetime.now(UTC)
    orphans = bind.execute(
        sa.select(runs.c.id, runs.c.base_uri, runs.c.base_sha, runs.c.adapters).where(
            runs.c.base_model_id.is_(None), runs.c.base_uri.is_not(None), runs.c.base_sha.is_not(None)
        )
    ).all()
    for run_id, base_uri, base_sha, run_adapter_json in orphans:
        base_id = _version_id(bind, base_models, base_uri, base_sha, now)
        bind.execute(runs.update().where(runs.c.id == run_id).values(base_model_id=base_id))
        if bind.execute(sa.select(run_adapters.c.id).where(run_adapters.c.run_id == run_id).limit(1)).first():
            continue
        listed = json.loads(run_adapter_json) if isinstance(run_adapter_json, str) else run_adapter_json
        for position, adapter in enumerate(listed or []):
            if not adapter.get("uri") or not adapter.get("sha"):
                continue
            adapter_id = _version_id(bind, adapters, adapter["uri"], adapter["sha"], now)
            bind.execute(run_adapters.insert().values(run_id=run_id, position=position, adapter_id=adapter_id,
                                                      weight=float(adapter.get("weight", 1.0))))


def _version_id(bind: sa.Connection, table: sa.Table, uri: str, sha: str, now: datetime) -> int:
    found = bind.execute(sa.select(table.c.id).where(table.c.uri == uri, table.c.sha == sha)).scalar()
    if found is None:
        bind.execute(table.insert().values(uri=uri, sha=sha, first_seen=now))
        found = bind.execute(sa.select(table.c.id).where(table.c.uri == uri, table.c.sha == sha)).scalar()
    return int(found)


def downgrade() -> None:
    op.drop_index("ix_publications_uri", "publications")
    op.drop_index("ix_artifacts_manifest_sha256", "artifacts")
    op.drop_index("ix_artifacts_uri", "artifacts")
    for name in RUN_INDEXES:
        op.drop_index(name, "runs")
    with op.batch_alter_table("runs") as batch:
        for column in RATIOS:
            batch.drop_column(column)
