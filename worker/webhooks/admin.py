"""Operator actions on webhooks: set a tenant's endpoint and secret, list and redeliver."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookSecret
from models.base import utcnow
from worker.broker.publish import Publisher
from worker.errors import InputError
from worker.webhooks import dispatch
from worker.webhooks.delivery import message_id
from worker.webhooks.signing import iso, new_secret

# A rotated-out secret keeps signing for this long, so receivers can switch without a gap.
ROTATION_OVERLAP = timedelta(hours=24)
MAX_TENANT_CHARS = 64


@dataclass(frozen=True)
class EndpointChange:
    """What `set_endpoint` did; `secret` only when a new one was made (shown once)."""

    tenant: str
    url: str
    secret: str | None
    previous_secret_expires_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tenant": self.tenant, "url": self.url}
        if self.secret is not None:
            out["secret"] = self.secret
        if self.previous_secret_expires_at is not None:
            out["previous_secret_expires_at"] = iso(self.previous_secret_expires_at)
        return out


def set_endpoint(
    session_factory: sessionmaker[Session],
    tenant: str,
    url: str | None,
    *,
    rotate_secret: bool = False,
    now: datetime | None = None,
) -> EndpointChange:
    """Create or update the tenant's endpoint (URL already checked). A new endpoint gets a
    secret; `rotate_secret` makes a new one and keeps the current one 24 h more."""
    if not tenant or len(tenant) > MAX_TENANT_CHARS:
        raise InputError("tenant_name", f"tenant name must be 1 to {MAX_TENANT_CHARS} characters")
    now = now or utcnow()
    with session_factory() as session, session.begin():
        endpoint = session.get(WebhookEndpoint, tenant, with_for_update=True)
        if endpoint is None:
            if url is None:
                raise InputError(
                    "webhook_url_missing", f"tenant {tenant} has no webhook yet: give --url"
                )
            session.add(WebhookEndpoint(tenant=tenant, url=url, created_at=now, updated_at=now))
            secret = new_secret()
            session.add(WebhookSecret(tenant=tenant, secret=secret, created_at=now))
            return EndpointChange(tenant, url, secret)
        if url is not None:
            endpoint.url = url
            endpoint.updated_at = now
        if not rotate_secret:
            return EndpointChange(tenant, endpoint.url, None)
        expires = now + ROTATION_OVERLAP
        # Secrets already expiring keep their own, earlier, end.
        session.execute(
            update(WebhookSecret)
            .where(WebhookSecret.tenant == tenant, WebhookSecret.expires_at.is_(None))
            .values(expires_at=expires)
        )
        secret = new_secret()
        session.add(WebhookSecret(tenant=tenant, secret=secret, created_at=now))
        return EndpointChange(tenant, endpoint.url, secret, expires)


def _failing() -> Any:
    d = WebhookDelivery
    return or_(
        d.status == DeliveryStatus.failed,
        and_(d.status == DeliveryStatus.pending, d.attempts > 0),
    )


def list_deliveries(
    session_factory: sessionmaker[Session],
    *,
    failed: bool = False,
    tenant: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first; `failed`: given up, or still retrying after a failed attempt."""
    d = WebhookDelivery
    query = select(d).order_by(d.created_at.desc(), d.id).limit(limit)
    if failed:
        query = query.where(_failing())
    if tenant is not None:
        query = query.where(d.tenant == tenant)
    with session_factory() as session:
        return [delivery_view(row) for row in session.scalars(query)]


def delivery_view(row: WebhookDelivery) -> dict[str, Any]:
    """The `webhooks list --json` object of one delivery."""
    return {
        "delivery_id": str(row.id),
        "webhook_id": message_id(row.id),
        "tenant": row.tenant,
        "type": row.event_type,
        "job_id": str(row.job_id) if row.job_id else None,
        "batch": row.batch,
        "status": row.status.value,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "created_at": iso(row.created_at),
        "next_attempt_at": iso(row.next_attempt_at)
        if row.status == DeliveryStatus.pending
        else None,
        "delivered_at": iso(row.delivered_at) if row.delivered_at else None,
    }


def parse_delivery_id(text: str) -> uuid.UUID:
    """A delivery id as `webhooks list` shows it (its uuid, or the msg_ webhook-id)."""
    try:
        return uuid.UUID(text.removeprefix("msg_"))
    except ValueError:
        raise InputError("delivery_id", f"not a delivery id: {text!r}") from None


def redeliver(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    *,
    ids: Sequence[uuid.UUID] | None = None,
    failed: bool = False,
    now: datetime | None = None,
) -> tuple[list[uuid.UUID], list[uuid.UUID], bool]:
    """Send deliveries again now, with a fresh retry window: the named ones (any status),
    or every failing one. Returns (redelivered, not found, published); unpublished ones
    are published by the sweeper."""
    if not ids and not failed:
        raise InputError("redeliver_selection", "name a delivery id, or --failed")
    now = now or utcnow()
    d = WebhookDelivery
    with session_factory() as session, session.begin():
        query = select(d.id)
        query = query.where(d.id.in_(ids)) if ids else query.where(_failing())
        found = list(session.scalars(query))
        if found:
            session.execute(
                update(d)
                .where(d.id.in_(found))
                .values(
                    status=DeliveryStatus.pending,
                    next_attempt_at=now,
                    window_started_at=now,
                    enqueued_at=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
    missing = [i for i in ids or [] if i not in set(found)]
    if not found:
        return found, missing, True
    try:
        publisher.publish(found)
    except Exception:
        return found, missing, False
    with session_factory() as session, session.begin():
        dispatch.mark_enqueued(session, found, now)
    return found, missing, True
