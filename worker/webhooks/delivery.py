"""Sending one outbox row: claim it, sign, POST once, record the attempt, schedule the next.

Plain code: the Celery task (`macao_ocr.deliver_webhook`, its own queue) passes a delivery
id and the process's dependencies. A delivery is claimed atomically (pending, due, not held
by a live sender), so a duplicate message or a redelivery races harmlessly. The claim holds
it for a lease; a sender killed mid-POST leaves it to be taken again once the lease passes
(the sweeper publishes it). At-least-once: a receiver dedupes on `webhook-id`.

Every attempt is recorded: HTTP status, latency, or the error's class. Never the response
body (a receiver may echo anything). Retries follow exponential backoff with full jitter
(`worker.backoff`) until an attempt fails after MACAO_OCR_WEBHOOK_MAX_AGE_S (24 h) from the
event (or its last manual redelivery); then the delivery is `failed` until redelivered.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Table, bindparam, insert, or_, select, update

from models import (
    DecisionReason,
    DeliveryStatus,
    Result,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
)
from models.base import UTCDateTime, utcnow
from worker.backoff import full_jitter_s
from worker.settings import Settings
from worker.webhooks import signing

log = structlog.get_logger(__name__)

DELIVERY: Table = WebhookDelivery.__table__  # type: ignore[assignment]
ATTEMPT: Table = WebhookAttempt.__table__  # type: ignore[assignment]
ENDPOINT: Table = WebhookEndpoint.__table__  # type: ignore[assignment]
SECRET: Table = WebhookSecret.__table__  # type: ignore[assignment]

# Over the POST's own timeout: a live sender never loses its delivery to another.
LEASE_MARGIN_S = 30.0


@dataclass(frozen=True)
class SendResult:
    """How one POST went: an HTTP status, or the class of the error that stopped it."""

    status_code: int | None
    latency_ms: int
    error_class: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


Sender = Callable[[str, Mapping[str, str], bytes], SendResult]


@dataclass(frozen=True)
class DeliveryDeps:
    """What `deliver` touches (the task builds the real ones; tests pass fakes)."""

    settings: Settings
    transaction: Callable[[], AbstractContextManager[Connection]]
    send: Sender
    clock: Callable[[], datetime] = utcnow
    rng: random.Random = field(default_factory=random.Random)


def _at(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


_DID = bindparam("did", type_=DELIVERY.c.id.type)

_CLAIM = (
    update(DELIVERY)
    .where(
        DELIVERY.c.id == _DID,
        DELIVERY.c.status == DeliveryStatus.pending.value,
        DELIVERY.c.next_attempt_at <= _at("now"),
        or_(DELIVERY.c.lease_expires_at.is_(None), DELIVERY.c.lease_expires_at < _at("now")),
    )
    .values(attempts=DELIVERY.c.attempts + 1, lease_expires_at=_at("lease_until"))
    .returning(
        DELIVERY.c.tenant,
        DELIVERY.c.event_type,
        DELIVERY.c.job_id,
        DELIVERY.c.batch,
        DELIVERY.c.tag,
        DELIVERY.c.job_status,
        DELIVERY.c.error_code,
        DELIVERY.c.created_at,
        DELIVERY.c.attempts,
        DELIVERY.c.window_started_at,
    )
)


def event_data(row: Mapping[str, Any]) -> dict[str, Any]:
    """The body's `data`: ids, status, error code, batch, tag. Nothing personal: the
    receiver reads the result itself, with its key."""
    if row["event_type"] == "batch.completed":
        return {"batch": row["batch"], "status": "completed"}
    data: dict[str, Any] = {
        "job_id": str(row["job_id"]),
        "status": row["job_status"],
        "error_code": row["error_code"],
        "batch": row["batch"],
        "tag": row["tag"],
    }
    data.update(decision_fields(row))
    return data


def decision_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """A succeeded job's card decision and its reason codes (codes only, never a detail:
    the receiver reads the rest with its key). Empty for other events."""
    if row["event_type"] != "job.succeeded" or "decision" not in row:
        return {}
    return {"decision": row["decision"], "reasons": list(row["reasons"])}


def _read_decision(conn: Connection, job_id: uuid.UUID) -> dict[str, Any]:
    """The stored decision of a succeeded job and its reason codes, in listed order."""
    decision = conn.execute(select(Result.decision).where(Result.job_id == job_id)).scalar()
    codes = conn.execute(
        select(DecisionReason.code)
        .where(DecisionReason.job_id == job_id)
        .order_by(DecisionReason.id)
    ).scalars()
    return {"decision": decision, "reasons": tuple(codes)}


def message_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` header: stable across every attempt of one delivery."""
    return f"msg_{delivery_id.hex}"


def deliver(delivery_id: str | uuid.UUID, deps: DeliveryDeps) -> str:
    """Make one attempt at a delivery if it is due; returns what happened (for the log)."""
    try:
        did = uuid.UUID(str(delivery_id))
    except ValueError:
        log.error("webhook_bad_delivery_id")
        return "not_claimed"
    settings = deps.settings
    now = deps.clock()
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S)
    with deps.transaction() as conn:
        row = conn.execute(_CLAIM, {"did": did, "now": now, "lease_until": lease_until}).first()
        if row is None:
            return "not_claimed"
        claimed = dict(row._mapping)
        if claimed["event_type"] == "job.succeeded" and claimed["job_id"] is not None:
            claimed.update(_read_decision(conn, claimed["job_id"]))
        url = conn.execute(
            select(ENDPOINT.c.url).where(ENDPOINT.c.tenant == claimed["tenant"])
        ).scalar()
        secrets_in_use = list(
            conn.execute(
                select(SECRET.c.secret)
                .where(
                    SECRET.c.tenant == claimed["tenant"],
                    or_(SECRET.c.expires_at.is_(None), SECRET.c.expires_at > now),
                )
                .order_by(SECRET.c.id.desc())
            ).scalars()
        )
    number = int(claimed["attempts"])
    if url is None or not secrets_in_use:
        # The tenant's endpoint was removed: nothing to send to, no retry can help.
        result = SendResult(status_code=None, latency_ms=0, error_class="NoEndpoint")
        return _record(deps, did, number, now, claimed, result, give_up=True)
    body = signing.body(claimed["event_type"], claimed["created_at"], event_data(claimed))
    headers = signing.headers(secrets_in_use, message_id(did), body, now=deps.clock())
    started = time.perf_counter()
    try:
        result = deps.send(url, headers, body)
    except Exception as err:  # a sender bug: recorded like a transport error, no text kept
        result = SendResult(
            status_code=None,
            latency_ms=int((time.perf_counter() - started) * 1000),
            error_class=type(err).__name__,
        )
    return _record(deps, did, number, now, claimed, result, give_up=False)


def _record(
    deps: DeliveryDeps,
    did: uuid.UUID,
    number: int,
    started_at: datetime,
    claimed: Mapping[str, Any],
    result: SendResult,
    *,
    give_up: bool,
) -> str:
    settings = deps.settings
    now = deps.clock()
    values: dict[str, Any] = {
        "lease_expires_at": None,
        "last_status_code": result.status_code,
        "last_error": result.error_class,
    }
    if result.ok:
        values.update(status=DeliveryStatus.delivered.value, delivered_at=now)
        outcome = "delivered"
    else:
        age_s = (now - claimed["window_started_at"]).total_seconds()
        if give_up or age_s >= settings.webhook_max_age_s:
            values["status"] = DeliveryStatus.failed.value
            outcome = "failed"
        else:
            delay_s = full_jitter_s(
                number,
                base_s=settings.webhook_backoff_base_s,
                max_s=settings.webhook_backoff_max_s,
                rng=deps.rng,
            )
            values["next_attempt_at"] = now + timedelta(seconds=delay_s)
            outcome = "retrying"
    with deps.transaction() as conn:
        conn.execute(
            insert(ATTEMPT).values(
                delivery_id=did,
                number=number,
                started_at=started_at,
                latency_ms=result.latency_ms,
                status_code=result.status_code,
                error_class=result.error_class,
            )
        )
        conn.execute(update(DELIVERY).where(DELIVERY.c.id == did).values(**values))
    log.info(
        "webhook_attempt",
        delivery_id=str(did),
        event_type=claimed["event_type"],
        attempt=number,
        status_code=result.status_code,
        error_class=result.error_class,
        latency_ms=result.latency_ms,
        outcome=outcome,
    )
    return outcome
