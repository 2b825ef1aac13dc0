"""Base models and adapters as rows, publications, the watch list, webhook deliveries;
quantization config columns on runs (for filters).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
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


def _versions_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("sha", sa.String(128), nullable=False),
        sa.Column("first_seen", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        sa.UniqueConstraint("uri", "sha", name=f"uq_{name}_uri_sha"),
    )
    op.create_index(f"ix_{name}_uri", name, ["uri"])
    op.create_index(f"ix_{name}_sha", name, ["sha"])


def upgrade() -> None:
    _versions_table("base_models")
    _versions_table("adapters")

    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("config", sa.String(64), nullable=True))
        batch.add_column(sa.Column("bits", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("group_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("desc_act", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("base_model_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_runs_base_model_id_base_models", "base_models", ["base_model_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_runs_config", ["config"])
        batch.create_index("ix_runs_base_model_id", ["base_model_id"])

    op.create_table(
        "run_adapters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_fk("run_adapters"),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column(
            "adapter_id",
            sa.Integer(),
            sa.ForeignKey("adapters.id", name="fk_run_adapters_adapter_id_adapters", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_run_adapters"),
        sa.UniqueConstraint("run_id", "position", name="uq_run_adapters_run_id_position"),
    )
    op.create_index("ix_run_adapters_run_id", "run_adapters", ["run_id"])
    op.create_index("ix_run_adapters_adapter_id", "run_adapters", ["adapter_id"])

    op.create_table(
        "publications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_fk("publications"),
        sa.Column("destination", sa.String(8), nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("revision", sa.String(255), nullable=True),
        sa.Column("commit_sha", sa.String(64), nullable=True),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.Column("published_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_publications"),
    )
    op.create_index("ix_publications_run_id", "publications", ["run_id"])
    op.create_index("ix_publications_manifest_sha256", "publications", ["manifest_sha256"])

    op.create_table(
        "watches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("repo", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("base", sa.String(1024), nullable=True),
        sa.Column("revision", sa.String(255), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("last_sha", sa.String(128), nullable=True),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
        sa.Column("updated_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_watches"),
        sa.UniqueConstraint("repo", name="uq_watches_repo"),
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(128), nullable=True),
        sa.Column("repo", sa.String(255), nullable=False),
        sa.Column("sha", sa.String(128), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("received_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("delivery_id", name="uq_webhook_deliveries_delivery_id"),
        sa.UniqueConstraint("repo", "sha", name="uq_webhook_deliveries_repo_sha"),
    )
    op.create_index("ix_webhook_deliveries_received_at", "webhook_deliveries", ["received_at"])

    _backfill_runs()


def _backfill_runs() -> None:
    """Fill the new run columns and source rows from what 0001 stored (spec and adapters JSON)."""
    bind = op.get_bind()
    runs = sa.table(
        "runs", sa.column("id", sa.String), sa.column("spec", sa.JSON), sa.column("base_uri", sa.String),
        sa.column("base_sha", sa.String), sa.column("adapters", sa.JSON), sa.column("config", sa.String),
        sa.column("bits", sa.Integer), sa.column("group_size", sa.Integer), sa.column("desc_act", sa.Boolean),
        sa.column("base_model_id", sa.Integer),
    )
    rows = bind.execute(sa.select(runs.c.id, runs.c.spec, runs.c.base_uri, runs.c.base_sha)).all()
    for run_id, spec, base_uri, base_sha in rows:
        values: dict[str, Any] = quant_columns(spec or {})
        bind.execute(runs.update().where(runs.c.id == run_id).values(**values))
    # Source rows for old runs are filled lazily: the next set_sources of a run writes them.


def quant_columns(spec: dict[str, Any]) -> dict[str, Any]:
    """The denormalised quantization columns of a run from its spec JSON (a frozen copy of
    ``QuantSpec.label()`` as of this revision: migrations must not import the live code)."""
    quant = spec.get("quantize") or {}
    bits, group = quant.get("bits", 4), quant.get("group_size", 128)
    desc_act = bool(quant.get("desc_act", False))
    label = f"gptq-{bits}bit-{'nogroup' if group == -1 else f'{group}g'}{'-actorder' if desc_act else ''}"
    return {"config": label, "bits": bits, "group_size": group, "desc_act": desc_act}


def downgrade() -> None:
    for table in ("webhook_deliveries", "watches", "publications", "run_adapters"):
        op.drop_table(table)
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_base_model_id")
        batch.drop_index("ix_runs_config")
        batch.drop_constraint("fk_runs_base_model_id_base_models", type_="foreignkey")
        for column in ("base_model_id", "desc_act", "group_size", "bits", "config"):
            batch.drop_column(column)
    op.drop_table("adapters")
    op.drop_table("base_models")
