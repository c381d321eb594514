"""Hardening: result columns as wide as the API returns; poison-job bookkeeping (issue: hardening).

- Every text the API returns (result fields, request ids, error codes) becomes unbounded
  `Text`: the reference documents no lengths, and a value over a guessed limit failed a job
  whose answer was already paid for. Warning codes become BIGINT (an array of integers of no
  documented range) and their names `Text` (`unknown_<code>` grows with the code).
- `kept_answer`: the answer of a job that could not be decoded or stored, kept so that a
  replay stores it without buying the job again.

Downgrade narrows the columns back; on PostgreSQL it refuses (and changes nothing) while a
stored value is longer than the old limit, rather than cutting it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, type before this revision, nullable)
WIDENED: tuple[tuple[str, str, sa.types.TypeEngine[object], bool], ...] = (
    ("result", "request_id", sa.String(length=100), False),
    ("result", "last_name_code", sa.String(length=100), True),
    ("result", "first_name_code", sa.String(length=100), True),
    ("result", "id_number", sa.String(length=32), True),
    ("result", "sex", sa.String(length=8), True),
    ("result", "validity_period_text", sa.String(length=64), True),
    ("result", "symbol", sa.String(length=16), True),
    ("result", "resident_type", sa.String(length=100), True),
    ("warning", "name", sa.String(length=32), False),
    ("attempt", "outcome_code", sa.String(length=100), True),
    ("attempt", "request_id", sa.String(length=100), True),
    ("job", "last_error_code", sa.String(length=100), True),
    ("job_event", "previous_error_code", sa.String(length=100), True),
)


def _tables() -> list[str]:
    return list(dict.fromkeys(table for table, *_ in WIDENED))


def upgrade() -> None:
    for table in _tables():
        with op.batch_alter_table(table) as batch:
            for t, column, old, nullable in WIDENED:
                if t == table:
                    batch.alter_column(
                        column, existing_type=old, type_=sa.Text(), existing_nullable=nullable
                    )
            if table == "warning":
                batch.alter_column(
                    "code",
                    existing_type=sa.SmallInteger(),
                    type_=sa.BigInteger(),
                    existing_nullable=False,
                )
    op.create_table(
        "kept_answer",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("response_json", sa.Text(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("kept_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["job.id"], name=op.f("fk_kept_answer_job_id_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_kept_answer")),
    )


def downgrade() -> None:
    op.drop_table("kept_answer")
    for table in _tables():
        with op.batch_alter_table(table) as batch:
            if table == "warning":
                batch.alter_column(
                    "code",
                    existing_type=sa.BigInteger(),
                    type_=sa.SmallInteger(),
                    existing_nullable=False,
                )
            for t, column, old, nullable in WIDENED:
                if t == table:
                    batch.alter_column(
                        column, existing_type=sa.Text(), type_=old, existing_nullable=nullable
                    )
