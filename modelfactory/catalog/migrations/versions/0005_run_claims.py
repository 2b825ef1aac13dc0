"""Run-key claims: the lock that serialises identical runs across hosts (``catalog/claims.py``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "run_claims",
        sa.Column("run_key", sa.String(128), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("claimed_at", TZ_DATETIME, nullable=False),
        sa.Column("renewed_at", TZ_DATETIME, nullable=False),
        sa.Column("expires_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("run_key", name="pk_run_claims"),
    )


def downgrade() -> None:
    op.drop_table("run_claims")
