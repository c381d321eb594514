"""Decisions: a verdict and reasons on every result, per-tenant warning policies (issue: decisions).

`result` gains `decision` (clear | consider | reject, NULL for results stored before this
revision: `macao-ocr decide` fills them), `decided_at` and `unreadable_fields`; reasons live
in `decision_reason` (filtered by code); tenants' overrides of the default policy live in
`warning_policy`. Batch mode: SQLite cannot add a CHECK constraint in place.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("result") as batch:
        batch.add_column(sa.Column("unreadable_fields", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("decision", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint(
            "decision", "decision IS NULL OR decision IN ('clear', 'consider', 'reject')"
        )
        batch.create_index("ix_result_decision", ["decision"])

    op.create_table(
        "decision_reason",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("code", sa.String(length=48), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("detail", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["result.job_id"],
            name=op.f("fk_decision_reason_job_id_result"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decision_reason")),
    )
    op.create_index("ix_decision_reason_job_id", "decision_reason", ["job_id"])
    op.create_index("ix_decision_reason_code", "decision_reason", ["code", "job_id"])

    op.create_table(
        "warning_policy",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("tenant", name=op.f("pk_warning_policy")),
    )


def downgrade() -> None:
    op.drop_table("warning_policy")
    op.drop_table("decision_reason")
    with op.batch_alter_table("result") as batch:
        batch.drop_index("ix_result_decision")
        batch.drop_constraint(op.f("ck_result_decision"), type_="check")
        batch.drop_column("decided_at")
        batch.drop_column("decision")
        batch.drop_column("unreadable_fields")
