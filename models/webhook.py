"""Webhooks: a tenant's endpoint and signing secrets, the delivery outbox, and its attempts.

Keyed by the tenant's name (the `job.tenant` string). An outbox row is written in the same
transaction (on PostgreSQL, the same statement) as the job or batch state change it tells of,
and keeps a snapshot of what the body says, so every retry sends the same message.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import (
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.job import Job


class DeliveryStatus(enum.StrEnum):
    pending = "pending"  # not yet acknowledged by the receiver; retried while in its window
    delivered = "delivered"  # a 2xx answer
    failed = "failed"  # its retry window ran out (or the URL is refused): redeliver by hand


class EventType(enum.StrEnum):
    job_succeeded = "job.succeeded"
    job_failed = "job.failed"
    batch_completed = "batch.completed"


class WebhookEndpoint(Base):
    """Where a tenant's events go (one endpoint per tenant)."""

    __tablename__ = "webhook_endpoint"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookSecret(Base):
    """A signing secret (`whsec_...`). Kept in clear: HMAC signing needs the key itself.
    `expires_at` NULL is the current secret; a rotated-out one signs until it expires."""

    __tablename__ = "webhook_secret"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoint.tenant", ondelete="CASCADE"), index=True
    )
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One message to one tenant's endpoint (the outbox); its id is the `webhook-id`."""

    __tablename__ = "webhook_delivery"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))
    # The body's snapshot: ids, status, error code, batch, tag. Never personal data.
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    batch: Mapped[str | None] = mapped_column(String(200))
    tag: Mapped[str | None] = mapped_column(String(200))
    job_status: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(
            DeliveryStatus,
            name="webhook_delivery_status",
            native_enum=False,
            length=16,
            create_constraint=True,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=DeliveryStatus.pending,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Retries stop once this is older than MACAO_OCR_WEBHOOK_MAX_AGE_S (a redelivery resets it).
    window_started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When its task message was last published (the sweeper publishes what is due).
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A sender holds the delivery until then; a dead sender's delivery is taken back after.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(100))

    __table_args__ = (
        Index("ix_webhook_delivery_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_delivery_tenant_created_at", "tenant", "created_at"),
        Index("ix_webhook_delivery_job_id", "job_id"),
    )


class WebhookAttempt(Base):
    """One POST: its HTTP status (or the error's class) and latency; never the response body."""

    __tablename__ = "webhook_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_delivery.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error_class: Mapped[str | None] = mapped_column(String(100))


# Unfinished jobs only, by batch: what the outbox probes to see whether a finishing job was
# its batch's last (worker.webhooks.outbox). Literal SQL on purpose: with a bound status list
# PostgreSQL could not prove that the probe matches the index predicate.
UNFINISHED_SQL = "status IN ('queued', 'running', 'retrying')"
UNFINISHED_BATCH_INDEX = Index(
    "ix_job_unfinished_batch",
    Job.__table__.c.tenant,
    Job.__table__.c.batch,
    postgresql_where=text(UNFINISHED_SQL),
    sqlite_where=text(UNFINISHED_SQL),
)
