"""Quota turn: the time a job deferred for quota holds in the fleet's line (issue 13).

A job deferred because its quota turn is beyond its wait comes back just before that turn
(`next_attempt_at`) and then waits for it in process as a holder of its place, instead of
joining the end of the line again (worker/quota/aimd.py, "The line"). NULL: no place held.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("quota_turn_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("quota_turn_at")
