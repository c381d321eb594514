"""The HTTP front door's tables: tenants, their API keys, idempotency keys, batches."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow


class Tenant(Base):
    """A caller of the HTTP API; `job.tenant` holds its name."""

    __tablename__ = "tenant"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """One API key of a tenant. Only the key's SHA-256 is kept; the key is shown once."""

    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenant.name", ondelete="CASCADE"))
    # Hex SHA-256 of the whole key: a 256-bit random key needs no slow hash (no dictionary).
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_api_key_tenant", "tenant"),)


class IdempotencyKey(Base):
    """A tenant's `Idempotency-Key`: inserted before the work, so one key makes one job."""

    __tablename__ = "idempotency_key"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of what was asked (endpoint and normalised body): another request -> 409.
    request_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when the request's work is committed; NULL while it runs.
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # A batch's 201 body (its job ids in request order), answered again as it was.
    response: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_idempotency_key_created_at", "created_at"),)


class Batch(Base):
    """Jobs submitted together. Terminal counts are kept as jobs finish (and replays undo
    them), so a batch's progress is one row read, never a COUNT over its jobs."""

    __tablename__ = "batch"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    total: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_batch_tenant_created_at", "tenant", "created_at"),)
