"""Webhooks: per-tenant endpoints and secrets, the delivery outbox and its attempts.

Written by hand to match models/webhook.py (checked by tests/unit/test_migrations.py).
The delivery status is VARCHAR(16) + a named CHECK, like the job's.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.rls import disable_rls, enable_tenant_rls

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WALLED = ("webhook_endpoint", "webhook_secret", "webhook_delivery")

DELIVERY_STATUSES = ("pending", "delivered", "failed")
UNFINISHED_SQL = "status IN ('queued', 'running', 'retrying')"


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoint",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        sa.PrimaryKeyConstraint("tenant", name=op.f("pk_webhook_endpoint")),
    )
    op.create_table(
        "webhook_secret",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        _ts("created_at", nullable=False),
        _ts("expires_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant"],
            ["webhook_endpoint.tenant"],
            name=op.f("fk_webhook_secret_tenant_webhook_endpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_secret")),
    )
    op.create_index("ix_webhook_secret_tenant", "webhook_secret", ["tenant"])

    statuses = ", ".join(f"'{s}'" for s in DELIVERY_STATUSES)
    op.create_table(
        "webhook_delivery",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("batch", sa.String(length=200), nullable=True),
        sa.Column("tag", sa.String(length=200), nullable=True),
        sa.Column("job_status", sa.String(length=16), nullable=True),
        sa.Column("error_code", sa.String(length=100), nullable=True),
        _ts("created_at", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("window_started_at", nullable=False),
        _ts("next_attempt_at", nullable=False),
        _ts("enqueued_at", nullable=True),
        _ts("lease_expires_at", nullable=True),
        _ts("delivered_at", nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=100), nullable=True),
        sa.CheckConstraint(
            f"status IN ({statuses})", name=op.f("ck_webhook_delivery_webhook_delivery_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_delivery")),
    )
    op.create_index(
        "ix_webhook_delivery_status_next_attempt_at",
        "webhook_delivery",
        ["status", "next_attempt_at"],
    )
    op.create_index(
        "ix_webhook_delivery_tenant_created_at", "webhook_delivery", ["tenant", "created_at"]
    )
    op.create_index("ix_webhook_delivery_job_id", "webhook_delivery", ["job_id"])

    op.create_table(
        "webhook_attempt",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        _ts("started_at", nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_class", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_delivery.id"],
            name=op.f("fk_webhook_attempt_delivery_id_webhook_delivery"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempt")),
    )
    op.create_index("ix_webhook_attempt_delivery_id", "webhook_attempt", ["delivery_id"])

    # The batch-completion probe's index: unfinished jobs only (models/webhook.py).
    op.create_index(
        "ix_job_unfinished_batch",
        "job",
        ["tenant", "batch"],
        postgresql_where=sa.text(UNFINISHED_SQL),
        sqlite_where=sa.text(UNFINISHED_SQL),
    )
    # Behind the tenant wall like every table that carries a tenant (migrations/rls.py).
    for table in WALLED:
        enable_tenant_rls(op, table)


def downgrade() -> None:
    for table in WALLED:
        disable_rls(op, table)
    op.drop_index("ix_job_unfinished_batch", table_name="job")
    op.drop_table("webhook_attempt")
    op.drop_table("webhook_delivery")
    op.drop_table("webhook_secret")
    op.drop_table("webhook_endpoint")
