"""`Idempotency-Key`: one key, one piece of work, per tenant, for at least `TTL`.

Claim, then seal in the work's own transaction:

1. `begin` inserts the key's row (primary key (tenant, key)) naming what the work will
   create: the job id, or the batch id and its whole answer, made up front. Of concurrent
   requests with one key exactly one insert wins; the others wait for its outcome and
   answer it again (`Idempotent-Replayed: true`). Another request under a used key is 409.
2. `seal` runs in the transaction that stores the work (the job row, or the batch row):
   it marks the row completed only if it still names this request's work, and otherwise
   raises `ClaimLost`, which rolls that transaction back. Work and seal commit together or
   not at all, so a server that dies anywhere leaves either both or neither.
3. A row left unsealed longer than `ABANDONED_AFTER` (its server died, or is very slow) is
   taken over: an UPDATE that renames the work to the taker's, only if the row is still
   unsealed and still names the old work. The seal and the take-over both lock the row, so
   whichever commits first wins and the other sees it: a slow first request that wakes up
   after a take-over finds `ClaimLost`, stores nothing, and answers the taker's job.
   Exactly one job per key, whatever the timing.

A request whose work fails before its seal removes its own row (by its work's id, so never
a taker's), and a retry runs anew.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from models import IdempotencyKey
from models.base import utcnow
from worker.http.intake import RequestDigest
from worker.http.problems import ProblemError

MAX_KEY_CHARS = 255
TTL = timedelta(hours=24)
ABANDONED_AFTER = timedelta(seconds=60)
WAIT_S = 20.0
POLL_S = 0.05
# Expired keys are deleted by the tenant's requests, this often at most per process.
PURGE_EVERY_S = 600.0
_purge_lock = threading.Lock()
_last_purge: dict[str, float] = {}


@dataclass(frozen=True)
class Done:
    """The outcome of the first request made with the key."""

    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    response: str | None = None


@dataclass(frozen=True)
class Claim:
    """This request owns the key: it must create exactly this work, and `seal` it."""

    tenant: str
    key: str
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None


class ClaimLost(Exception):
    """The key was taken over before this request sealed it: its work must not be stored
    (raised inside the work's transaction, which it rolls back). Never leaves the API."""


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS:
        raise ProblemError(
            400,
            "idempotency_key_invalid",
            "Invalid Idempotency-Key",
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} characters",
        )


def conflict() -> ProblemError:
    return ProblemError(
        409,
        "idempotency_key_reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was used with a different request",
    )


def _in_progress() -> ProblemError:
    return ProblemError(
        409,
        "idempotency_key_in_progress",
        "Request in progress",
        "a request with this Idempotency-Key is still being processed; retry later",
        headers={"Retry-After": "1"},
    )


def begin(
    session_factory: sessionmaker[Session],
    tenant: str,
    key: str,
    digest: str | RequestDigest,
    *,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    response: str | None = None,
) -> Done | Claim:
    """Claim the key for the work named (`job_id`, or `batch_id` with its `response`):
    a Claim means do it (then `seal` in its transaction, or `abandon`); Done means it was
    done already, answer it again. 409 for another request, or one still running."""
    check_key(key)
    stored_form = digest if isinstance(digest, str) else digest.value
    same = digest.__eq__ if isinstance(digest, str) else digest.matches
    _purge_expired(session_factory, tenant)
    deadline = time.monotonic() + WAIT_S
    claim = Claim(tenant=tenant, key=key, job_id=job_id, batch_id=batch_id)
    while True:
        now = utcnow()
        with session_factory() as session:
            session.add(
                IdempotencyKey(
                    tenant=tenant,
                    key=key,
                    request_sha256=stored_form,
                    created_at=now,
                    job_id=job_id,
                    batch_id=batch_id,
                    response=response,
                )
            )
            try:
                session.commit()
                return claim
            except IntegrityError:
                session.rollback()
            row = session.get(IdempotencyKey, (tenant, key))
            if row is None:
                continue  # removed in between (abandoned or expired): try again
            if row.created_at < now - TTL:
                _delete_if(session, row)
                continue
            if not same(row.request_sha256):
                raise conflict()
            if row.completed_at is not None:
                return Done(job_id=row.job_id, batch_id=row.batch_id, response=row.response)
            if row.created_at < now - ABANDONED_AFTER and _take_over(
                session, row, now, claim, response
            ):
                return claim
        if time.monotonic() > deadline:
            raise _in_progress()
        time.sleep(POLL_S)


def _purge_expired(session_factory: sessionmaker[Session], tenant: str) -> None:
    with _purge_lock:
        if time.monotonic() - _last_purge.get(tenant, float("-inf")) < PURGE_EVERY_S:
            return
        _last_purge[tenant] = time.monotonic()
    with session_factory() as session, session.begin():
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.tenant == tenant, IdempotencyKey.created_at < utcnow() - TTL
            )
        )


def _same_row(row: IdempotencyKey) -> list[ColumnElement[bool]]:
    """The key's row as `row` saw it: still unsealed and naming the same work."""
    return [
        IdempotencyKey.tenant == row.tenant,
        IdempotencyKey.key == row.key,
        IdempotencyKey.created_at == row.created_at,
        IdempotencyKey.completed_at.is_(None),
        _names(row.job_id, row.batch_id),
    ]


def _names(job_id: uuid.UUID | None, batch_id: uuid.UUID | None) -> ColumnElement[bool]:
    if job_id is not None:
        return IdempotencyKey.job_id == job_id
    if batch_id is not None:
        return IdempotencyKey.batch_id == batch_id
    return IdempotencyKey.job_id.is_(None) & IdempotencyKey.batch_id.is_(None)


def _delete_if(session: Session, row: IdempotencyKey) -> None:
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant == row.tenant,
            IdempotencyKey.key == row.key,
            IdempotencyKey.created_at == row.created_at,
        )
    )
    session.commit()


def _take_over(
    session: Session, row: IdempotencyKey, now: datetime, claim: Claim, response: str | None
) -> bool:
    """Rename a stale claim's work to ours, if nobody sealed or took it meanwhile (the
    UPDATE waits for a seal in progress, then finds the row sealed and changes nothing)."""
    taken = session.execute(
        update(IdempotencyKey)
        .where(*_same_row(row))
        .values(created_at=now, job_id=claim.job_id, batch_id=claim.batch_id, response=response)
    )
    session.commit()
    return bool(getattr(taken, "rowcount", 0))


def seal(session: Session, claim: Claim) -> None:
    """In the work's transaction: the key's answer is this work, or ClaimLost (roll back)."""
    sealed = session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.tenant == claim.tenant,
            IdempotencyKey.key == claim.key,
            IdempotencyKey.completed_at.is_(None),
            _names(claim.job_id, claim.batch_id),
        )
        .values(completed_at=utcnow())
    )
    if not getattr(sealed, "rowcount", 0):
        raise ClaimLost


def abandon(session_factory: sessionmaker[Session], claim: Claim, *, sealed: bool = False) -> None:
    """The work failed: free the key for a retry, if it is still ours. `sealed`: also when
    the seal committed (a batch whose later chunks failed: the retry makes a new batch)."""
    conditions = [
        IdempotencyKey.tenant == claim.tenant,
        IdempotencyKey.key == claim.key,
        _names(claim.job_id, claim.batch_id),
    ]
    if not sealed:
        conditions.append(IdempotencyKey.completed_at.is_(None))
    with session_factory() as session, session.begin():
        session.execute(delete(IdempotencyKey).where(*conditions))
