"""Decisions: the reasons behind a result's decision, and each tenant's warning policy."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow

DECISIONS = ("clear", "consider", "reject")
REASON_SOURCES = ("warning", "check")


class DecisionReason(Base):
    """One reason of a result's decision (a code, never personal data), in listed order."""

    __tablename__ = "decision_reason"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("result.job_id", ondelete="CASCADE"), index=True
    )
    code: Mapped[str] = mapped_column(String(48))
    source: Mapped[str] = mapped_column(String(8))
    detail: Mapped[str] = mapped_column(String(200))

    # `jobs --reason CODE`
    __table_args__ = (Index("ix_decision_reason_code", "code", "job_id"),)


class WarningPolicy(Base):
    """A tenant's overrides of the default policy (code → effect); absent: the defaults."""

    __tablename__ = "warning_policy"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    rules: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))
