"""Tenant wall: PostgreSQL row-level security on every table that carries a tenant (issue: privacy).

Tables with a `tenant` column are walled on it; tables whose rows belong to a job (a `job_id`
column, no tenant of their own: attempt, job_event, result, warning, portrait, and whatever the
migrations before this one added) are walled through their job's tenant, so no column is
added and nothing can drift out of step with the job. See migrations/rls.py for the policies
and the two roles; tables added by later migrations call its helpers themselves.

PostgreSQL only: a no-op on SQLite.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.rls import (
    disable_rls,
    enable_job_rls,
    enable_tenant_rls,
    ensure_roles,
    job_tables,
    tenant_tables,
    walled_tables,
)

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    ensure_roles(op)
    for table in tenant_tables(op):
        enable_tenant_rls(op, table)
    # After the tenant tables: the job policy reads `job`, which must already be walled.
    for table in job_tables(op):
        enable_job_rls(op, table)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # Children first: their policy refers to `job`.
    for table in sorted(walled_tables(op), key=lambda t: t == "job"):
        disable_rls(op, table)
