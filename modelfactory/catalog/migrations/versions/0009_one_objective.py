"""One name per objective: a sweep's ``smallest`` / ``fastest`` / ``closest`` are ``size`` / ``speed`` /
``quality``, the names ``catalog best --by`` uses (``core.sweep_spec.Objective``). Rewrites
``sweeps.objective``; the stored spec JSON keeps what the user wrote.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Frozen here (migrations must not import live code).
RENAMED = {"smallest": "size", "fastest": "speed", "closest": "quality"}


def upgrade() -> None:
    for old, new in RENAMED.items():
        op.execute(f"UPDATE sweeps SET objective = '{new}' WHERE objective = '{old}'")


def downgrade() -> None:
    for old, new in RENAMED.items():
        op.execute(f"UPDATE sweeps SET objective = '{old}' WHERE objective = '{new}'")
