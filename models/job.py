"""Jobs, their API attempts, their history events, and uploaded images."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, UTCDateTime, utcnow


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed})

# A finished job whose images and URLs retention has not deleted yet (the sweeper's index;
# finished only, so the many row versions of a job in flight add no entry to it).
IMAGES_HELD_SQL = "images_deleted_at IS NULL AND status IN ('succeeded', 'failed')"


class Image(Base):
    """Uploaded image bytes, readable by any worker by reference (the job row's image id)."""

    __tablename__ = "image"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    # Hex HMAC-SHA256 of the bytes under a subkey of the data key that sealed them
    # (worker.privacy.seal.Sealer.image_digest): finds a tenant's identical image without a
    # plain digest that would confirm a known card.
    digest: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(Integer)
    # The bytes, sealed (worker.privacy.seal).
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_image_tenant_digest", "tenant", "digest"),)


class Job(Base):
    """One card to read. Status moves queued -> running -> (retrying -> running)* -> terminal."""

    __tablename__ = "job"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    status: Mapped[JobStatus] = mapped_column(
        # VARCHAR + CHECK rather than a native type: the same on PostgreSQL and SQLite,
        # and a new status is a one-line migration instead of an ALTER TYPE.
        Enum(
            JobStatus,
            name="job_status",
            native_enum=False,
            length=16,
            create_constraint=True,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=JobStatus.queued,
    )
    # The image URLs, sealed (worker.privacy.seal): they point at a person's card and may
    # carry tokens.
    front_url: Mapped[bytes | None] = mapped_column(LargeBinary)
    front_image_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("image.id"))
    back_url: Mapped[bytes | None] = mapped_column(LargeBinary)
    back_image_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("image.id"))
    portrait: Mapped[bool] = mapped_column(Boolean, default=False)
    tag: Mapped[str | None] = mapped_column(String(200))
    batch: Mapped[str | None] = mapped_column(String(200))
    # The batch row (POST /v1/batches) whose counters this job moves; NULL for others. No
    # foreign key: SQLite could only add or drop one by rebuilding the job table.
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # API calls that spent the failure budget; throttles and account pauses do not count.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Every API call made for this job, whatever its outcome.
    api_calls: Mapped[int] = mapped_column(Integer, default=0)
    # Codes come from the API (no documented length) or are ours.
    last_error_code: Mapped[str | None] = mapped_column(Text)
    last_error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Deferred for quota: the turn it holds in the fleet's line (it comes back just before,
    # at next_attempt_at, and waits for it as a holder). NULL: no place held.
    quota_turn_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A running job whose lease has passed belongs to a dead worker: the sweeper takes it back.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_host: Mapped[str | None] = mapped_column(String(200))
    # When retention or erasure deleted the job's images and image URLs: it can no longer be
    # sent (replay refuses it). NULL while it holds them.
    images_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When `macao-ocr erase` removed every personal piece of the job: never called for again.
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    attempt_rows: Mapped[list[Attempt]] = relationship(
        back_populates="job", order_by="Attempt.number", cascade="all, delete-orphan"
    )
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.at", cascade="all, delete-orphan"
    )

    __table_args__ = (
        CheckConstraint(
            "front_url IS NOT NULL OR front_image_id IS NOT NULL "
            "OR back_url IS NOT NULL OR back_image_id IS NOT NULL "
            "OR images_deleted_at IS NOT NULL",
            name="has_image",
        ),
        Index("ix_job_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_job_tenant_batch", "tenant", "batch"),
        Index("ix_job_last_error_code", "last_error_code"),
        Index("ix_job_created_at", "created_at"),
        Index("ix_job_batch_id", "batch_id"),
        # The HTTP API's listing (keyset on created_at, id) and its backlog count.
        Index("ix_job_tenant_created_at_id", "tenant", "created_at", "id"),
        Index("ix_job_tenant_status", "tenant", "status"),
        # Who still uses an image (worker.store.retention counts them before deleting one):
        # partial, so jobs whose images are gone cost nothing.
        Index(
            "ix_job_front_image_id",
            "front_image_id",
            postgresql_where=text("front_image_id IS NOT NULL"),
            sqlite_where=text("front_image_id IS NOT NULL"),
        ),
        Index(
            "ix_job_back_image_id",
            "back_image_id",
            postgresql_where=text("back_image_id IS NOT NULL"),
            sqlite_where=text("back_image_id IS NOT NULL"),
        ),
        # The sweeper's image retention: finished jobs that still hold images (small: a
        # succeeded job leaves it within a sweep under the default retention of 0).
        Index(
            "ix_job_images_held",
            "status",
            "finished_at",
            postgresql_where=text(IMAGES_HELD_SQL),
            sqlite_where=text(IMAGES_HELD_SQL),
        ),
        Index(
            "ix_job_erased_at",
            "erased_at",
            postgresql_where=text("erased_at IS NOT NULL"),
            sqlite_where=text("erased_at IS NOT NULL"),
        ),
    )


class Attempt(Base):
    """One row per API call."""

    __tablename__ = "attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "OK", a Tencent code, or one of ours (Transport.*, WorkerLost).
    outcome_code: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    worker_host: Mapped[str | None] = mapped_column(String(200))

    job: Mapped[Job] = relationship(back_populates="attempt_rows")

    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_attempt_job_number"),)


class JobEvent(Base):
    """History beyond API calls: replays (who, why), recoveries, pauses."""

    __tablename__ = "job_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # replay | recovered | republished | ...
    actor: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    previous_status: Mapped[str | None] = mapped_column(String(16))
    previous_error_code: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="events")

    __table_args__ = (Index("ix_job_event_job_id", "job_id"),)
