"""Who read a result's personal fields: one row per job shown, per read (issue 12's audit)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow


class AccessLog(Base):
    """One read that showed a job's personal fields (or a local file's, `job_id` NULL).

    No foreign key to the job: the log outlives what it records (an erased or purged job's
    reads stay auditable). Behind the tenant wall on its `tenant` column."""

    __tablename__ = "access_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The OS user (CLI: `user@host`) or `key:<key_id>` (HTTP API).
    actor: Mapped[str] = mapped_column(String(200))
    tenant: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # cli.status, cli.jobs, cli.read, api.job, api.jobs, api.portrait
    how: Mapped[str] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_access_log_tenant_at", "tenant", "at"),
        Index("ix_access_log_job_id", "job_id"),
    )
