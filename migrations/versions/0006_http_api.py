"""HTTP front door: tenants, API keys, idempotency keys, batches with counters (issue: http api).

`job.batch_id` names the batch row whose counters a job moves (no foreign key: SQLite could
add or drop one only by rebuilding the job table). Two job indexes serve the API: its keyset
listing (tenant, created_at, id) and its per-tenant backlog count (tenant, status).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.rls import disable_rls, enable_tenant_rls

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WALLED = ("api_key", "idempotency_key", "batch")


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "tenant",
        sa.Column("name", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenant")),
    )
    op.create_table(
        "api_key",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant"],
            ["tenant.name"],
            name=op.f("fk_api_key_tenant_tenant"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_sha256", name=op.f("uq_api_key_key_sha256")),
    )
    op.create_index("ix_api_key_tenant", "api_key", ["tenant"])
    op.create_table(
        "idempotency_key",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        _ts("completed_at", nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tenant", "key", name=op.f("pk_idempotency_key")),
    )
    op.create_index("ix_idempotency_key_created_at", "idempotency_key", ["created_at"])
    op.create_table(
        "batch",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        _ts("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch")),
    )
    op.create_index("ix_batch_tenant_created_at", "batch", ["tenant", "created_at"])
    op.add_column("job", sa.Column("batch_id", sa.Uuid(), nullable=True))
    op.create_index("ix_job_batch_id", "job", ["batch_id"])
    op.create_index("ix_job_tenant_created_at_id", "job", ["tenant", "created_at", "id"])
    op.create_index("ix_job_tenant_status", "job", ["tenant", "status"])
    # Behind the tenant wall like every table that carries a tenant (migrations/rls.py).
    # The HTTP API resolves a key to its tenant as the operator role (the key is all it has).
    for table in WALLED:
        enable_tenant_rls(op, table)


def downgrade() -> None:
    for table in WALLED:
        disable_rls(op, table)
    op.drop_index("ix_job_tenant_status", table_name="job")
    op.drop_index("ix_job_tenant_created_at_id", table_name="job")
    op.drop_index("ix_job_batch_id", table_name="job")
    op.drop_column("job", "batch_id")
    op.drop_index("ix_batch_tenant_created_at", table_name="batch")
    op.drop_table("batch")
    op.drop_index("ix_idempotency_key_created_at", table_name="idempotency_key")
    op.drop_table("idempotency_key")
    op.drop_index("ix_api_key_tenant", table_name="api_key")
    op.drop_table("api_key")
    op.drop_table("tenant")
