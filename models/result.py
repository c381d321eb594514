"""What a successful call bought: one result per job (enforced), its warnings, its portrait."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow

PERSONAL_HELD_SQL = "personal_deleted_at IS NULL"


class Result(Base):
    """A column for every response field. job_id is the primary key: two results cannot exist.

    Every text the API returns is unbounded `Text`: the reference documents no lengths, and
    a value longer than a guessed limit would fail a job whose answer is already paid for."""

    __tablename__ = "result"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("job.id", ondelete="CASCADE"), primary_key=True
    )
    request_id: Mapped[str] = mapped_column(Text)
    # Personal fields: AES-256-GCM envelopes (worker.privacy.seal), dates and the height as
    # their ISO text inside. Bound to this row and column; NULL when the card showed none.
    cn_last_name: Mapped[bytes | None] = mapped_column(LargeBinary)
    en_last_name: Mapped[bytes | None] = mapped_column(LargeBinary)
    last_name_code: Mapped[bytes | None] = mapped_column(LargeBinary)
    cn_first_name: Mapped[bytes | None] = mapped_column(LargeBinary)
    en_first_name: Mapped[bytes | None] = mapped_column(LargeBinary)
    first_name_code: Mapped[bytes | None] = mapped_column(LargeBinary)
    id_number: Mapped[bytes | None] = mapped_column(LargeBinary)
    birthday: Mapped[bytes | None] = mapped_column(LargeBinary)
    sex: Mapped[str | None] = mapped_column(Text)
    first_issue_date: Mapped[bytes | None] = mapped_column(LargeBinary)
    current_issue_date: Mapped[bytes | None] = mapped_column(LargeBinary)
    validity_period: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Kept verbatim; the only value when the card has no expiry date.
    validity_period_text: Mapped[bytes | None] = mapped_column(LargeBinary)
    symbol: Mapped[bytes | None] = mapped_column(LargeBinary)
    height_m: Mapped[bytes | None] = mapped_column(LargeBinary)
    angle: Mapped[float | None] = mapped_column(Float)
    resident_type: Mapped[str | None] = mapped_column(Text)
    warning_service_disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Fields present in the answer but not readable as their type (comma-separated names):
    # the checks need them, and the value columns above can only hold None for them.
    unreadable_fields: Mapped[str | None] = mapped_column(String(200))
    # clear | consider | reject (worker.decision); NULL for a result stored before decisions.
    # On the result, not the job: it is derived from the result and goes with it (a forced
    # replay deletes both).
    decision: Mapped[str | None] = mapped_column(String(8))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # HMAC-SHA256 of the normalised ID number under MACAO_OCR_LOOKUP_KEY (worker.privacy.lookup):
    # finds a person's jobs without decrypting; NULL when no lookup key was configured.
    id_number_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    # When retention or erasure deleted the personal fields (worker.privacy.fields), their
    # lookup hashes and the portrait; the row keeps codes, warnings and the decision.
    personal_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(
            "decision IS NULL OR decision IN ('clear', 'consider', 'reject')", name="decision"
        ),
        Index("ix_result_decision", "decision"),
        Index("ix_result_id_number_hash", "id_number_hash"),
        # The sweeper's result retention: results whose personal fields are still held.
        Index(
            "ix_result_personal_held",
            "created_at",
            postgresql_where=text(PERSONAL_HELD_SQL),
            sqlite_where=text(PERSONAL_HELD_SQL),
        ),
    )


class Warning(Base):
    """One card warning (WarnCardInfos) with its stable name."""

    __tablename__ = "warning"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("result.job_id", ondelete="CASCADE"), index=True
    )
    # WarnCardInfos is an array of integers of no documented range; an unknown code's name
    # (`unknown_<code>`) grows with it.
    code: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(Text)


class Portrait(Base):
    """The RetImage portrait, apart from the result so listing results never loads it."""

    __tablename__ = "portrait"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("result.job_id", ondelete="CASCADE"), primary_key=True
    )
    # The image's bytes, sealed (worker.privacy.seal).
    data: Mapped[bytes] = mapped_column(LargeBinary)


class KeptAnswer(Base):
    """An answer the API gave that could not be decoded or stored (a poison job).

    The `Response` object exactly as received (JSON), so `macao-ocr replay` can store it once
    the fault is fixed without buying the job again. It holds personal data like a result
    does, and is deleted when the answer is stored."""

    __tablename__ = "kept_answer"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("job.id", ondelete="CASCADE"), primary_key=True
    )
    # The attempt (API call) that bought it.
    attempt_number: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(Text)
    # The JSON text, sealed (worker.privacy.seal): it holds what a result holds.
    response_json: Mapped[bytes] = mapped_column(LargeBinary)
    # `decode` or `store`, and the exception's type (never its text, which may hold values).
    stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    kept_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
