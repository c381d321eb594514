"""Which deliveries need a task message now (the sweeper publishes them after their commit).

Due: pending, its next attempt's time come, no live sender holding it, and no message
published for this attempt yet, or one published longer ago than MACAO_OCR_REPUBLISH_AFTER_S
(lost with a Redis restart, or its sender died). A duplicate is harmless: the claim takes a
delivery once per attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from models import DeliveryStatus, WebhookDelivery


def due_deliveries(
    session: Session, now: datetime, *, republish_after_s: float, limit: int
) -> list[uuid.UUID]:
    """Ids of deliveries to publish now, oldest due first."""
    d = WebhookDelivery
    stale = now - timedelta(seconds=republish_after_s)
    return list(
        session.scalars(
            select(d.id)
            .where(
                d.status == DeliveryStatus.pending,
                d.next_attempt_at <= now,
                or_(d.lease_expires_at.is_(None), d.lease_expires_at < now),
                or_(
                    d.enqueued_at.is_(None),
                    d.enqueued_at < d.next_attempt_at,
                    d.enqueued_at < stale,
                ),
            )
            .order_by(d.next_attempt_at)
            .limit(limit)
        )
    )


def mark_enqueued(session: Session, ids: Sequence[uuid.UUID], at: datetime) -> None:
    """Record that these deliveries' messages went out (after the publish succeeded)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids))
        .values(enqueued_at=at)
        .execution_options(synchronize_session=False)
    )
