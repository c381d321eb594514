"""Retention, erasure and the access log (issue 12).

- `job.images_deleted_at`, `job.erased_at`: when retention or erasure deleted the job's images
  and URLs, when it was erased. The `has_image` check now accepts a job whose images are
  gone (but still refuses one that never had any).
- `result.personal_deleted_at`: when its personal fields and portrait were deleted.
- Indexes: who uses an image (counted before one is deleted), the sweeper's two retention
  scans, erased jobs.
- `access_log`: every read that showed a result's personal fields, behind the tenant wall.

Written by hand to match models/ (checked by tests/integration/test_migrations.py).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.rls import disable_rls, enable_tenant_rls

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HAS_IMAGE = (
    "front_url IS NOT NULL OR front_image_id IS NOT NULL "
    "OR back_url IS NOT NULL OR back_image_id IS NOT NULL"
)
HAS_IMAGE_OR_DELETED = HAS_IMAGE + " OR images_deleted_at IS NOT NULL"
IMAGES_HELD = "images_deleted_at IS NULL AND status IN ('succeeded', 'failed')"


def _ts(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def _partial(name: str, table: str, columns: list[str], where: str) -> None:
    op.create_index(
        name, table, columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where)
    )


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(_ts("images_deleted_at"))
        batch.add_column(_ts("erased_at"))
        batch.drop_constraint(op.f("ck_job_has_image"), type_="check")
        batch.create_check_constraint(op.f("ck_job_has_image"), HAS_IMAGE_OR_DELETED)
    with op.batch_alter_table("result") as batch:
        batch.add_column(_ts("personal_deleted_at"))
    _partial("ix_job_front_image_id", "job", ["front_image_id"], "front_image_id IS NOT NULL")
    _partial("ix_job_back_image_id", "job", ["back_image_id"], "back_image_id IS NOT NULL")
    _partial("ix_job_images_held", "job", ["status", "finished_at"], IMAGES_HELD)
    _partial("ix_job_erased_at", "job", ["erased_at"], "erased_at IS NOT NULL")
    _partial("ix_result_personal_held", "result", ["created_at"], "personal_deleted_at IS NULL")

    op.create_table(
        "access_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("how", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_log")),
    )
    op.create_index("ix_access_log_tenant_at", "access_log", ["tenant", "at"])
    op.create_index("ix_access_log_job_id", "access_log", ["job_id"])
    enable_tenant_rls(op, "access_log")


def downgrade() -> None:
    disable_rls(op, "access_log")
    op.drop_table("access_log")
    op.drop_index("ix_result_personal_held", table_name="result")
    op.drop_index("ix_job_erased_at", table_name="job")
    op.drop_index("ix_job_images_held", table_name="job")
    op.drop_index("ix_job_back_image_id", table_name="job")
    op.drop_index("ix_job_front_image_id", table_name="job")
    with op.batch_alter_table("result") as batch:
        batch.drop_column("personal_deleted_at")
    # A job whose images retention deleted cannot satisfy the old check: the downgrade
    # refuses to run while one exists rather than invent an image for it.
    with op.batch_alter_table("job") as batch:
        batch.drop_constraint(op.f("ck_job_has_image"), type_="check")
        batch.create_check_constraint(op.f("ck_job_has_image"), HAS_IMAGE)
        batch.drop_column("erased_at")
        batch.drop_column("images_deleted_at")
