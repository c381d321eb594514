"""`Idempotency-Key`: one key, one piece of work, per tenant, for at least `TTL`.

Insert-first: the key's row is committed before the work starts, under the table's primary
key (tenant, key). Of concurrent requests with one key, exactly one insert wins; the others
wait for its outcome and answer it again (`Idempotent-Replayed: true`). Another request
under a used key is 409. A request whose work fails removes its row, so a retry runs anew;
a row left pending by a dead server is taken over after `ABANDONED_AFTER`.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from models import IdempotencyKey
from models.base import utcnow
from worker.http.problems import ProblemError

MAX_KEY_CHARS = 255
TTL = timedelta(hours=24)
ABANDONED_AFTER = timedelta(seconds=60)
WAIT_S = 20.0
POLL_S = 0.05
# Expired keys are deleted by whichever server process gets there first, this often at most.
PURGE_EVERY_S = 600.0
_purge_lock = threading.Lock()
_last_purge = [float("-inf")]


@dataclass(frozen=True)
class Done:
    """The outcome of the first request made with the key."""

    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    response: str | None = None


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS:
        raise ProblemError(
            400,
            "idempotency_key_invalid",
            "Invalid Idempotency-Key",
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} characters",
        )


def _conflict() -> ProblemError:
    return ProblemError(
        409,
        "idempotency_key_reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was used with a different request",
    )


def begin(
    session_factory: sessionmaker[Session], tenant: str, key: str, digest: str
) -> Done | None:
    """None: the caller owns the key and does the work (then `complete` or `abandon`).
    Done: the work was done already; answer it again. 409 for another request."""
    check_key(key)
    _purge_expired(session_factory)
    deadline = time.monotonic() + WAIT_S
    while True:
        now = utcnow()
        with session_factory() as session:
            session.add(
                IdempotencyKey(tenant=tenant, key=key, request_sha256=digest, created_at=now)
            )
            try:
                session.commit()
                return None
            except IntegrityError:
                session.rollback()
            row = session.get(IdempotencyKey, (tenant, key))
            if row is None:
                continue  # removed in between (abandoned or expired): try again
            if row.created_at < now - TTL:
                _delete_if(session, row)
                continue
            if row.request_sha256 != digest:
                raise _conflict()
            if row.completed_at is not None:
                return Done(job_id=row.job_id, batch_id=row.batch_id, response=row.response)
            if row.created_at < now - ABANDONED_AFTER and _take_over(session, row, now):
                return None
        if time.monotonic() > deadline:
            raise ProblemError(
                409,
                "idempotency_key_in_progress",
                "Request in progress",
                "a request with this Idempotency-Key is still being processed; retry later",
                headers={"Retry-After": "1"},
            )
        time.sleep(POLL_S)


def _purge_expired(session_factory: sessionmaker[Session]) -> None:
    with _purge_lock:
        if time.monotonic() - _last_purge[0] < PURGE_EVERY_S:
            return
        _last_purge[0] = time.monotonic()
    with session_factory() as session, session.begin():
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - TTL))


def _delete_if(session: Session, row: IdempotencyKey) -> None:
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant == row.tenant,
            IdempotencyKey.key == row.key,
            IdempotencyKey.created_at == row.created_at,
        )
    )
    session.commit()


def _take_over(session: Session, row: IdempotencyKey, now: object) -> bool:
    taken = session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.tenant == row.tenant,
            IdempotencyKey.key == row.key,
            IdempotencyKey.created_at == row.created_at,
            IdempotencyKey.completed_at.is_(None),
        )
        .values(created_at=now)
    )
    session.commit()
    return bool(getattr(taken, "rowcount", 0))


def complete(
    session_factory: sessionmaker[Session],
    tenant: str,
    key: str,
    *,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    response: str | None = None,
) -> None:
    """The work is committed: later requests with the key answer it again."""
    with session_factory() as session, session.begin():
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.tenant == tenant, IdempotencyKey.key == key)
            .values(completed_at=utcnow(), job_id=job_id, batch_id=batch_id, response=response)
        )


def abandon(session_factory: sessionmaker[Session], tenant: str, key: str) -> None:
    """The work failed and nothing was stored: free the key for a retry."""
    with session_factory() as session, session.begin():
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.tenant == tenant,
                IdempotencyKey.key == key,
                IdempotencyKey.completed_at.is_(None),
            )
        )
