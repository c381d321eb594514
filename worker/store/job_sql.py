"""The worker's per-job SQL: statements built once, run on a Connection with parameters.

On PostgreSQL a job's success path is two statements: the claim with its first attempt, and
the success (result with its decision, warnings, decision reasons, attempt closed, job
succeeded), each as data-modifying CTEs.
Elsewhere (SQLite, the demo) the same steps run as five statements plus one for warnings.
Each statement is built at import and compiled once per process (SQLAlchemy's cache), so a
run only binds parameters: building expression trees and the ORM's unit of work per job were
most of a worker's SQL CPU, and each statement saved is about 2% of a busy worker's CPU.

The claim returns everything the call needs (the job's request, its budget, whether a result
is already stored, whether a dead worker left an attempt open, the image bytes) through
scalar subqueries in its RETURNING clause. PostgreSQL and SQLite (3.35+) both run it.

Personal values cross this module sealed (worker.privacy.seal): the claim opens the URLs and
image bytes it returns, the success seals the result's personal fields and the portrait (and
writes the ID number's lookup hash) before they are bound.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    LargeBinary,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from models import Attempt, DecisionReason, Image, Job, JobStatus, Portrait, Result, Warning
from models.base import UTCDateTime, utcnow
from worker.decision.engine import Decision
from worker.privacy.seal import Sealer
from worker.store import terminal
from worker.tencent.types import OcrResult
from worker.webhooks import outbox

JOB: Table = Job.__table__  # type: ignore[assignment]
ATTEMPT: Table = Attempt.__table__  # type: ignore[assignment]
RESULT: Table = Result.__table__  # type: ignore[assignment]
WARNING: Table = Warning.__table__  # type: ignore[assignment]
PORTRAIT: Table = Portrait.__table__  # type: ignore[assignment]
IMAGE: Table = Image.__table__  # type: ignore[assignment]
REASON: Table = DecisionReason.__table__  # type: ignore[assignment]


def _at(name: str) -> Any:
    # Typed explicitly: inside func.coalesce a bare bindparam would skip UTCDateTime's
    # conversion (SQLite stores naive UTC).
    return bindparam(name, type_=UTCDateTime())


_JID = bindparam("jid", type_=JOB.c.id.type)


def _job_update(**values: Any) -> Any:
    """UPDATE of the job named by the `jid` parameter."""
    return update(JOB).where(JOB.c.id == _JID).values(**values)


def _claim_statement(*, plain: bool = False) -> Any:
    now = _at("now")
    due = or_(JOB.c.next_attempt_at.is_(None), JOB.c.next_attempt_at <= now)
    claimable = and_(
        or_(
            # Two equalities, not IN: an IN list is re-rendered at every execution (expanding).
            and_(or_(JOB.c.status == JobStatus.queued, JOB.c.status == JobStatus.retrying), due),
            and_(JOB.c.status == JobStatus.running, JOB.c.lease_expires_at < now),
        ),
        # An erased job is never called for again, whatever its status says
        # (worker.store.erasure fails it too; this holds even if something resets it).
        JOB.c.erased_at.is_(None),
    )
    # The outer row is named literally: SQLite's compiler renders RETURNING columns without
    # their table, so inside a subquery `job.id` would come out as an ambiguous `id`.
    job_id: Any = literal_column(f"{JOB.name}.id")
    open_attempts = select(func.count()).where(
        ATTEMPT.c.job_id == job_id, ATTEMPT.c.finished_at.is_(None)
    )
    last_number = select(func.coalesce(func.max(ATTEMPT.c.number), 0)).where(
        ATTEMPT.c.job_id == job_id
    )
    bought = select(func.count()).where(RESULT.c.job_id == job_id)
    front_id: Any = literal_column(f"{JOB.name}.front_image_id")
    back_id: Any = literal_column(f"{JOB.name}.back_image_id")
    # Images over `inline_max` are read only once the worker has room for them in memory
    # (worker.membudget); their sizes come back either way.
    inline = IMAGE.c.size_bytes <= bindparam("inline_max", type_=Integer())
    front = select(case((inline, IMAGE.c.data))).where(IMAGE.c.id == front_id)
    back = select(case((inline, IMAGE.c.data))).where(IMAGE.c.id == back_id)
    front_size = select(IMAGE.c.size_bytes).where(IMAGE.c.id == front_id)
    back_size = select(IMAGE.c.size_bytes).where(IMAGE.c.id == back_id)
    where = [JOB.c.id == _JID, claimable]
    if plain:
        # Only a start with nothing to sort out first: no attempt left open, no result.
        lost = select(ATTEMPT.c.number).where(
            ATTEMPT.c.job_id == job_id, ATTEMPT.c.finished_at.is_(None)
        )
        stored = select(RESULT.c.job_id).where(RESULT.c.job_id == job_id)
        where += [~lost.exists(), ~stored.exists()]
    return (
        update(JOB)
        .where(*where)
        .values(
            status=JobStatus.running,
            lease_expires_at=_at("lease_until"),
            started_at=func.coalesce(JOB.c.started_at, now),
            worker_host=bindparam("host"),
            # Counted here for the attempt the start opens; undone if none is opened.
            api_calls=JOB.c.api_calls + 1,
        )
        .returning(
            JOB.c.id,
            JOB.c.started_at,
            JOB.c.quota_turn_at,
            JOB.c.tenant,
            JOB.c.attempts,
            JOB.c.portrait,
            JOB.c.front_url,
            JOB.c.front_image_id,
            JOB.c.back_url,
            JOB.c.back_image_id,
            open_attempts.scalar_subquery().label("open_attempts"),
            last_number.scalar_subquery().label("last_number"),
            bought.scalar_subquery().label("bought"),
            front.scalar_subquery().label("front_data"),
            back.scalar_subquery().label("back_data"),
            front_size.scalar_subquery().label("front_size"),
            back_size.scalar_subquery().label("back_size"),
        )
    )


_CLAIM = _claim_statement()

# `inline_max` when every image comes with the claim (the largest value an INTEGER holds).
NO_INLINE_LIMIT = 2**31 - 1

_LOAD_IMAGES = select(IMAGE.c.id, IMAGE.c.data).where(
    IMAGE.c.id.in_(bindparam("ids", expanding=True))
)


def _claim_and_open_statement(claim_statement: Any) -> Any:
    # PostgreSQL only: the claim and, for a plain start (no lost attempt to close first, no
    # result already bought), its first attempt, in one statement. The sub-statements share
    # one snapshot, so the claim's subqueries do not see the attempt being inserted.
    claimed = claim_statement.cte("claimed")
    opened = (
        insert(ATTEMPT)
        .from_select(
            ["job_id", "number", "started_at", "worker_host"],
            select(_JID, claimed.c.last_number + 1, _at("now"), bindparam("host")).where(
                claimed.c.open_attempts == 0, claimed.c.bought == 0
            ),
        )
        .returning(ATTEMPT.c.number)
        .cte("opened")
    )
    was_opened = select(func.count()).select_from(opened).scalar_subquery()
    return select(claimed, was_opened.label("opened"))


_CLAIM_AND_OPEN = _claim_and_open_statement(_CLAIM)
_CLAIM_PLAIN = _claim_and_open_statement(_claim_statement(plain=True))

WORKER_LOST = "WorkerLost"

_CLOSE_LOST = (
    update(ATTEMPT)
    .where(ATTEMPT.c.job_id == _JID, ATTEMPT.c.finished_at.is_(None))
    .values(finished_at=_at("now"), outcome_code=WORKER_LOST, message="worker lost mid-call")
)

_RENEW_LEASE = _job_update(lease_expires_at=_at("lease_until"))

_SPEND = _job_update(attempts=JOB.c.attempts + bindparam("n"))

_INSERT_ATTEMPT = insert(ATTEMPT).values(
    job_id=_JID, number=bindparam("num"), started_at=_at("now"), worker_host=bindparam("host")
)

_COUNT_CALL = _job_update(api_calls=JOB.c.api_calls + 1, lease_expires_at=_at("lease_until"))

_UNCOUNT_CALL = _job_update(api_calls=JOB.c.api_calls - 1)

_DELETE_ATTEMPT = delete(ATTEMPT).where(
    ATTEMPT.c.job_id == _JID, ATTEMPT.c.number == bindparam("num")
)

_CLOSE_ATTEMPT = (
    update(ATTEMPT)
    .where(ATTEMPT.c.job_id == _JID, ATTEMPT.c.number == bindparam("num"))
    .values(
        started_at=_at("a_started"),
        finished_at=_at("a_finished"),
        outcome_code=bindparam("a_code"),
        message=bindparam("a_message"),
        request_id=bindparam("a_request_id"),
        latency_ms=bindparam("a_latency_ms"),
    )
)

_SUCCEEDED = _job_update(
    status=JobStatus.succeeded,
    finished_at=_at("done_at"),
    lease_expires_at=None,
    next_attempt_at=None,
    attempts=JOB.c.attempts + 1,
)

_ALREADY_SUCCEEDED = _job_update(
    status=JobStatus.succeeded,
    finished_at=func.coalesce(JOB.c.finished_at, _at("now")),
    lease_expires_at=None,
    next_attempt_at=None,
    api_calls=JOB.c.api_calls - 1,
)

_FAIL = _job_update(
    status=JobStatus.failed,
    finished_at=_at("now"),
    lease_expires_at=None,
    next_attempt_at=None,
    last_error_code=bindparam("code"),
    last_error_message=bindparam("message"),
)

_RETRY = _job_update(
    status=JobStatus.retrying,
    next_attempt_at=_at("next_at"),
    lease_expires_at=None,
    quota_turn_at=None,
    last_error_code=bindparam("code"),
    last_error_message=bindparam("message"),
)

_DEFER = _job_update(
    status=JobStatus.retrying,
    next_attempt_at=_at("next_at"),
    lease_expires_at=None,
    quota_turn_at=_at("turn_at"),
)

_LAST_ERROR = _job_update(
    last_error_code=bindparam("code"), last_error_message=bindparam("message")
)

_HAS_RESULT = select(RESULT.c.job_id).where(RESULT.c.job_id == _JID)
_INSERT_RESULT = insert(RESULT)
# Every result column but the key, the row's own timestamp and the decision's columns
# (`_decision_params`) is an OcrResult field of the same name (checked here, so a column added
# without its field fails at import).
_OWN_COLUMNS = (
    "job_id",
    "created_at",
    "unreadable_fields",
    "decision",
    "decided_at",
    "id_number_hash",
    "personal_deleted_at",
)
_RESULT_FIELDS = tuple(c.name for c in RESULT.c if c.name not in _OWN_COLUMNS)
_missing = set(_RESULT_FIELDS) - {f.name for f in dataclasses.fields(OcrResult)}
if _missing:
    raise RuntimeError(f"result columns without an OcrResult field: {sorted(_missing)}")
_INSERT_WARNING = insert(WARNING)
_INSERT_PORTRAIT = insert(PORTRAIT)
_INSERT_REASON = insert(REASON)


def _decision_params(
    result: OcrResult, decision: Decision | None, decided_at: datetime
) -> dict[str, Any]:
    """The result's own columns beyond the API's fields (prefixed like them)."""
    return {
        "r_unreadable_fields": ",".join(result.unreadable or ()) or None,
        "r_decision": None if decision is None else decision.outcome.value,
        "r_decided_at": None if decision is None else decided_at,
    }


def reason_rows(job_id: uuid.UUID, decision: Decision | None) -> list[dict[str, Any]]:
    """decision_reason rows of a decision, in its order."""
    if decision is None:
        return []
    return [
        {"job_id": job_id, "code": r.code, "source": r.source.value, "detail": r.detail[:200]}
        for r in decision.reasons
    ]


def _succeed_statement() -> Any:
    # PostgreSQL only: result, warnings, the attempt's close and the job's success in ONE
    # statement (data-modifying CTEs always run to completion, referenced or not; the
    # warnings' foreign key to the new result is checked at the end of the statement). A
    # second result still raises IntegrityError, and nothing of the statement holds.
    # Prefixed: a bindparam named like an INSERT's own column is reserved by SQLAlchemy.
    values: dict[str, Any] = {
        n: bindparam(f"r_{n}", type_=RESULT.c[n].type)
        for n in (*_RESULT_FIELDS, "unreadable_fields", "decision", "id_number_hash")
    }
    values["decided_at"] = _at("r_decided_at")
    result = (
        insert(RESULT)
        .values(job_id=_JID, created_at=_at("r_created_at"), **values)
        .returning(RESULT.c.job_id)
        .cte("new_result")
    )
    rows = (
        func.unnest(
            bindparam("w_codes", type_=ARRAY(BigInteger())),
            bindparam("w_names", type_=ARRAY(String())),
        )
        .table_valued("code", "name")
        .render_derived()
    )
    warnings = (
        insert(WARNING)
        .from_select(
            ["job_id", "code", "name"],
            select(result.c.job_id, rows.c.code, rows.c.name).select_from(
                result.join(rows, true())
            ),
        )
        .cte("new_warnings")
    )
    # The portrait only when asked for and returned: a NULL parameter selects no row. The
    # cast types the parameter when it is NULL (a prepared statement keeps its first types).
    data = cast(bindparam("p_data"), LargeBinary())
    portrait = (
        insert(PORTRAIT)
        .from_select(["job_id", "data"], select(result.c.job_id, data).where(data.is_not(None)))
        .cte("new_portrait")
    )
    reason_rows = (
        func.unnest(
            bindparam("d_codes", type_=ARRAY(String())),
            bindparam("d_sources", type_=ARRAY(String())),
            bindparam("d_details", type_=ARRAY(String())),
        )
        .table_valued("code", "source", "detail", with_ordinality="ord")
        .render_derived()
    )
    reasons = (
        insert(REASON)
        .from_select(
            ["job_id", "code", "source", "detail"],
            select(result.c.job_id, reason_rows.c.code, reason_rows.c.source, reason_rows.c.detail)
            .select_from(result.join(reason_rows, true()))
            # Ids in the decision's order: reasons are listed by id.
            .order_by(reason_rows.c.ord),
        )
        .cte("new_reasons")
    )
    attempt = _CLOSE_ATTEMPT.cte("closed_attempt")
    # Terminal side effects in the same statement: the batch counter, and the webhook outbox
    # rows (job.succeeded, and batch.completed for a batch's last job; only for a tenant with
    # an endpoint).
    side_effects = (*terminal.terminal_ctes(JobStatus.succeeded), *outbox.success_ctes())
    return _SUCCEEDED.add_cte(result, warnings, reasons, portrait, attempt, *side_effects)


_SUCCEED_PG = _succeed_statement()


@dataclass(frozen=True)
class Claimed:
    """What the claim returned: the job's request inputs, its budget and its history."""

    started_at: datetime
    attempts: int
    portrait: bool
    front_url: str | None  # opened (the column holds it sealed)
    front_image_id: uuid.UUID | None
    back_url: str | None
    back_image_id: uuid.UUID | None
    open_attempts: int
    last_number: int
    bought: bool
    # The stored images' bytes (opened): None for a side over the claim's `inline_max` (read it with
    # `load_images`) or with no stored image; their sizes whenever one is stored.
    front_data: bytes | None
    back_data: bytes | None
    front_size: int | None = None
    back_size: int | None = None
    # Whether the claim opened attempt `last_number + 1` (only with open_attempt=True, and
    # only when no attempt was left open and no result is stored).
    opened: bool = False
    # Whose job: the decision applies this tenant's warning policy.
    tenant: str = "default"
    # The quota turn the job holds in the fleet's line (deferred for quota), or None.
    quota_turn_at: datetime | None = None


def claim(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    now: datetime,
    lease_until: datetime,
    host: str,
    sealer: Sealer,
    open_attempt: bool = False,
    inline_max: int = NO_INLINE_LIMIT,
) -> Claimed | None:
    """Take the job if it is due (queued/retrying) or its lease expired; None if not ours.

    With `open_attempt`, a plain start also opens its first attempt (`Claimed.opened`): in
    the same statement on PostgreSQL, right after it elsewhere. Images larger than
    `inline_max` bytes are not read (their `Claimed` data is None, their size given)."""
    params = {
        "jid": job_id,
        "now": now,
        "lease_until": lease_until,
        "host": host,
        "inline_max": inline_max,
    }
    in_one = open_attempt and conn.dialect.name == "postgresql"
    row = conn.execute(_CLAIM_AND_OPEN if in_one else _CLAIM, params).first()
    if row is None:
        return None
    m = row._mapping
    claimed = _claimed(m, sealer, opened=bool(m["opened"]) if in_one else False)
    if open_attempt and not in_one and not claimed.open_attempts and not claimed.bought:
        insert_attempt(conn, job_id, claimed.last_number + 1, now=now, host=host)
        claimed = dataclasses.replace(claimed, opened=True)
    return claimed


def claim_plain(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    now: datetime,
    lease_until: datetime,
    host: str,
    sealer: Sealer,
    inline_max: int = NO_INLINE_LIMIT,
) -> Claimed | None:
    """PostgreSQL only: take the job if it is a plain start (due or its lease expired, no
    attempt left open, no result stored) and open its first attempt, in ONE statement, so
    it may run on its own, outside a transaction. None otherwise: `claim` sorts out why."""
    params = {
        "jid": job_id,
        "now": now,
        "lease_until": lease_until,
        "host": host,
        "inline_max": inline_max,
    }
    row = conn.execute(_CLAIM_PLAIN, params).first()
    if row is None:
        return None
    return _claimed(row._mapping, sealer, opened=True)


def _claimed(m: Any, sealer: Sealer, *, opened: bool) -> Claimed:
    job_id = m["id"]
    return Claimed(
        started_at=m["started_at"],
        attempts=int(m["attempts"]),
        portrait=bool(m["portrait"]),
        front_url=sealer.open_url(job_id, "front_url", m["front_url"]),
        front_image_id=m["front_image_id"],
        back_url=sealer.open_url(job_id, "back_url", m["back_url"]),
        back_image_id=m["back_image_id"],
        open_attempts=int(m["open_attempts"]),
        last_number=int(m["last_number"]),
        bought=bool(m["bought"]),
        front_data=sealer.open_image(m["front_image_id"], m["front_data"]),
        back_data=sealer.open_image(m["back_image_id"], m["back_data"]),
        front_size=m["front_size"],
        back_size=m["back_size"],
        opened=opened,
        tenant=m["tenant"],
        quota_turn_at=m["quota_turn_at"],
    )


def close_lost_attempts(conn: Connection, job_id: uuid.UUID, now: datetime) -> int:
    """Close attempts a dead worker left open as WorkerLost, spending their budget."""
    lost = conn.execute(_CLOSE_LOST, {"jid": job_id, "now": now})
    count = int(getattr(lost, "rowcount", 0) or 0)
    if count:
        conn.execute(_SPEND, {"jid": job_id, "n": count})
    return count


def count_lost(conn: Connection, job_id: uuid.UUID, *, since: datetime | None) -> int:
    """Attempts of the job that ended with its worker lost, since `since` (the job's current
    round: a replay clears `started_at`, so older rounds do not count)."""
    query = select(func.count()).where(
        ATTEMPT.c.job_id == job_id, ATTEMPT.c.outcome_code == WORKER_LOST
    )
    if since is not None:
        query = query.where(ATTEMPT.c.started_at >= since)
    return int(conn.execute(query).scalar() or 0)


def load_images(conn: Connection, ids: list[uuid.UUID], sealer: Sealer) -> dict[uuid.UUID, bytes]:
    """The (opened) bytes of stored images by id (those the claim left out for their size)."""
    return {
        row.id: sealer.open("image", "data", row.id, row.data)
        for row in conn.execute(_LOAD_IMAGES, {"ids": ids})
    }


def renew_lease(conn: Connection, job_id: uuid.UUID, *, lease_until: datetime) -> None:
    """Extend a running job's lease (it waits for memory before its call)."""
    conn.execute(_RENEW_LEASE, {"jid": job_id, "lease_until": lease_until})


def insert_attempt(
    conn: Connection, job_id: uuid.UUID, number: int, *, now: datetime, host: str
) -> None:
    """The attempt row, opened before the slot is reserved (the claim counted the call)."""
    conn.execute(_INSERT_ATTEMPT, {"jid": job_id, "num": number, "now": now, "host": host})


def count_call(conn: Connection, job_id: uuid.UUID, *, lease_until: datetime) -> None:
    """Count one more call and renew the lease over its quota wait (a later attempt)."""
    conn.execute(_COUNT_CALL, {"jid": job_id, "lease_until": lease_until})


def drop_attempt(conn: Connection, job_id: uuid.UUID, number: int) -> None:
    """The slot was refused or never used: no call, so no attempt and no count."""
    conn.execute(_DELETE_ATTEMPT, {"jid": job_id, "num": number})
    conn.execute(_UNCOUNT_CALL, {"jid": job_id})


def close_attempt(conn: Connection, job_id: uuid.UUID, number: int, call: CallRecord) -> None:
    """Record how one call went."""
    conn.execute(_CLOSE_ATTEMPT, {"jid": job_id, "num": number, **call.params()})


@dataclass(frozen=True)
class CallRecord:
    """How one call went, as its attempt row keeps it."""

    started_at: datetime
    finished_at: datetime
    code: str
    message: str | None
    request_id: str | None
    latency_ms: int

    def params(self) -> dict[str, Any]:
        return {
            "a_started": self.started_at,
            "a_finished": self.finished_at,
            "a_code": self.code,
            "a_message": self.message,
            "a_request_id": self.request_id,
            "a_latency_ms": self.latency_ms,
        }


def store_success(
    conn: Connection,
    job_id: uuid.UUID,
    number: int,
    call: CallRecord,
    result: OcrResult,
    portrait: bool,
    decision: Decision | None = None,
    *,
    sealer: Sealer,
) -> None:
    """Result, warnings, decision and its reasons, portrait, attempt closed and job
    succeeded; the caller commits.

    One statement on PostgreSQL, so it may run on its own, outside a transaction (see
    `worker.store.engine.make_autocommit_engine`); three to five elsewhere. A second result for
    the job raises IntegrityError and changes nothing. `decision` None: none could be made
    (`macao-ocr decide` makes it later)."""
    if conn.dialect.name != "postgresql":
        insert_result(conn, job_id, result, portrait, decision, call.finished_at, sealer=sealer)
        close_attempt(conn, job_id, number, call)
        mark_succeeded(conn, job_id, call.finished_at)
        terminal.on_job_terminal(conn, job_id, JobStatus.succeeded, now=call.finished_at)
        return
    reasons = decision.reasons if decision is not None else ()
    params = {
        "jid": job_id,
        "num": number,
        "done_at": call.finished_at,
        "r_created_at": utcnow(),
        "w_codes": [w.code for w in result.warnings],
        "w_names": [w.name for w in result.warnings],
        "d_codes": [r.code for r in reasons],
        "d_sources": [r.source.value for r in reasons],
        "d_details": [r.detail[:200] for r in reasons],
        **_decision_params(result, decision, call.finished_at),
        **call.params(),
        **{f"r_{name}": value for name, value in _result_values(job_id, result, sealer).items()},
        "p_data": sealer.seal_portrait(job_id, result.portrait) if portrait else None,
        **outbox.event_params(call.finished_at, prefix="wh"),
        **outbox.event_params(call.finished_at, prefix="whb"),
    }
    conn.execute(_SUCCEED_PG, params)


def mark_succeeded(conn: Connection, job_id: uuid.UUID, done_at: datetime) -> None:
    """The job succeeded with this attempt (which spent one unit of its budget), with its
    terminal side effects (batch counter, webhook outbox rows) in the same transaction."""
    conn.execute(_SUCCEEDED, {"jid": job_id, "done_at": done_at})
    outbox.record_job_finished(conn, job_id, done_at)


def mark_already_succeeded(conn: Connection, job_id: uuid.UUID, now: datetime) -> None:
    """A result was stored before this claim: succeeded, and the claim's count undone."""
    conn.execute(_ALREADY_SUCCEEDED, {"jid": job_id, "now": now})
    terminal.on_job_terminal(conn, job_id, JobStatus.succeeded, now=now)
    outbox.record_job_finished(conn, job_id, now)


def mark_failed(
    conn: Connection, job_id: uuid.UUID, now: datetime, code: str, message: str
) -> None:
    """Terminal failure with its error code and message, and its terminal side effects (batch
    counter, webhook outbox rows) in the same transaction."""
    conn.execute(_FAIL, {"jid": job_id, "now": now, "code": code, "message": message})
    terminal.on_job_terminal(conn, job_id, JobStatus.failed, now=now)
    outbox.record_job_finished(conn, job_id, now)


def uncount_call(conn: Connection, job_id: uuid.UUID) -> None:
    """Undo the claim's count when the start opens no attempt."""
    conn.execute(_UNCOUNT_CALL, {"jid": job_id})


def spend(conn: Connection, job_id: uuid.UUID, n: int = 1) -> None:
    """Spend `n` units of the job's failure budget."""
    conn.execute(_SPEND, {"jid": job_id, "n": n})


def schedule_retry(
    conn: Connection, job_id: uuid.UUID, next_at: datetime, code: str, message: str
) -> None:
    """Back to `retrying`, due at `next_at`, remembering the error."""
    conn.execute(_RETRY, {"jid": job_id, "next_at": next_at, "code": code, "message": message})


def defer(
    conn: Connection, job_id: uuid.UUID, next_at: datetime, turn_at: datetime | None = None
) -> None:
    """Back to `retrying`, due at `next_at`, the last error left as it was. `turn_at`: the
    quota turn the job holds (deferred for quota), else None."""
    conn.execute(_DEFER, {"jid": job_id, "next_at": next_at, "turn_at": turn_at})


def set_last_error(conn: Connection, job_id: uuid.UUID, code: str, message: str | None) -> None:
    """Remember an error that leaves the job running (throttle, re-sign)."""
    conn.execute(_LAST_ERROR, {"jid": job_id, "code": code, "message": message})


def has_result(conn: Connection, job_id: uuid.UUID) -> bool:
    """Whether a result row exists for the job."""
    return conn.execute(_HAS_RESULT, {"jid": job_id}).first() is not None


def insert_result(
    conn: Connection,
    job_id: uuid.UUID,
    result: OcrResult,
    portrait: bool,
    decision: Decision | None = None,
    decided_at: datetime | None = None,
    *,
    sealer: Sealer,
) -> None:
    """The result row, its warnings, its decision's reasons and (when asked for) the portrait,
    personal fields sealed.

    A second result for the job raises IntegrityError (the result's key is the job id)."""
    values = _result_values(job_id, result, sealer)
    own = _decision_params(result, decision, decided_at or utcnow())
    values.update({k.removeprefix("r_"): v for k, v in own.items()})
    conn.execute(_INSERT_RESULT, {"job_id": job_id, **values})
    if result.warnings:
        conn.execute(
            _INSERT_WARNING,
            [{"job_id": job_id, "code": w.code, "name": w.name} for w in result.warnings],
        )
    rows = reason_rows(job_id, decision)
    if rows:
        conn.execute(_INSERT_REASON, rows)
    if portrait and result.portrait is not None:
        conn.execute(
            _INSERT_PORTRAIT,
            {"job_id": job_id, "data": sealer.seal_portrait(job_id, result.portrait)},
        )


def _result_values(job_id: uuid.UUID, result: OcrResult, sealer: Sealer) -> dict[str, Any]:
    """The result's API columns, personal ones sealed, and the ID number's lookup hash."""
    return sealer.seal_result(job_id, {name: getattr(result, name) for name in _RESULT_FIELDS})
