"""The outbox: a delivery row written in the same transaction as the state change it tells of.

Only for tenants with an endpoint: every statement here selects through `webhook_endpoint`,
so a tenant without one gets no row (and pays one index probe).

A batch completes when its last unfinished job finishes: the finishing transaction inserts
`batch.completed` when no OTHER job of the batch (same tenant and `job.batch`) is unfinished.
Cheap: the probe reads the partial index `ix_job_unfinished_batch`, which holds unfinished jobs
only, and stops at the first. Correct under concurrency on PostgreSQL: the probe locks the
row it finds (`FOR UPDATE`, LIMIT 1). A row whose job another transaction is finishing is
locked by it, so the probe waits for that commit and re-reads the row (then finished, it is
skipped). When the last two jobs finish at once each waits for the other: PostgreSQL aborts
one as a deadlock, nothing of it holds, and its retry (the pipeline rides out database errors,
`worker.pipeline._with_db`) sees the other committed and writes the event, exactly once.
SQLite runs one writer at a time, so the probe sees every committed finish. (The batch table
with O(1) counters of the HTTP API makes the probe a counter read; see README.)
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    case,
    literal,
    null,
    select,
    text,
)
from sqlalchemy import insert as sa_insert

from models import DeliveryStatus, EventType, Job, JobStatus, WebhookDelivery, WebhookEndpoint
from models.base import UTCDateTime
from models.webhook import UNFINISHED_SQL

JOB: Table = Job.__table__  # type: ignore[assignment]
DELIVERY: Table = WebhookDelivery.__table__  # type: ignore[assignment]
ENDPOINT: Table = WebhookEndpoint.__table__  # type: ignore[assignment]


_COLUMNS = [
    "id",
    "tenant",
    "event_type",
    "job_id",
    "batch",
    "tag",
    "job_status",
    "error_code",
    "created_at",
    "status",
    "attempts",
    "window_started_at",
    "next_attempt_at",
]


def _at(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


def _job_id() -> Any:
    return bindparam("jid", type_=JOB.c.id.type)


def job_event_insert(*, status: JobStatus | None = None, prefix: str = "wh") -> Any:
    """INSERT of the job's `job.succeeded`/`job.failed` delivery, when its tenant has an
    endpoint. `status` None: read from the row (run AFTER the job's update, in its
    transaction); given: the status the same statement is setting (a CTE beside it, whose
    snapshot still shows the old row). Parameters: jid, `<prefix>_id`, `<prefix>_now`."""
    now = _at(f"{prefix}_now")
    if status is None:
        job_status: Any = JOB.c.status
        event: Any = case(
            (JOB.c.status == JobStatus.succeeded.value, EventType.job_succeeded.value),
            else_=EventType.job_failed.value,
        )
        error_code: Any = case(
            (JOB.c.status == JobStatus.failed.value, JOB.c.last_error_code), else_=null()
        )
        where = [JOB.c.id == _job_id(), JOB.c.status.in_(_terminal())]
    else:
        job_status = literal(status.value)
        event = literal(
            EventType.job_succeeded.value
            if status == JobStatus.succeeded
            else EventType.job_failed.value
        )
        error_code = null() if status == JobStatus.succeeded else JOB.c.last_error_code
        where = [JOB.c.id == _job_id()]
    rows = (
        select(
            bindparam(f"{prefix}_id", type_=DELIVERY.c.id.type),
            JOB.c.tenant,
            event,
            JOB.c.id,
            JOB.c.batch,
            JOB.c.tag,
            job_status,
            error_code,
            now,
            literal(DeliveryStatus.pending.value),
            literal(0),
            now,
            now,
        )
        .select_from(JOB.join(ENDPOINT, ENDPOINT.c.tenant == JOB.c.tenant))
        .where(*where)
    )
    return sa_insert(DELIVERY).from_select(_COLUMNS, rows)


def _terminal() -> list[str]:
    return [JobStatus.succeeded.value, JobStatus.failed.value]


def batch_event_insert(*, prefix: str = "whb") -> Any:
    """INSERT of `batch.completed` when the job named by `jid` has a batch, its tenant an
    endpoint, and no other job of the batch is unfinished (see the module doc). Parameters:
    jid, `<prefix>_id`, `<prefix>_now`."""
    now = _at(f"{prefix}_now")
    other = JOB.alias("other_job")
    unfinished = (
        select(other.c.id)
        .where(
            other.c.tenant == select(JOB.c.tenant).where(JOB.c.id == _job_id()).scalar_subquery(),
            other.c.batch == select(JOB.c.batch).where(JOB.c.id == _job_id()).scalar_subquery(),
            other.c.id != _job_id(),
            text(UNFINISHED_SQL.replace("status", "other_job.status")),
        )
        .limit(1)
        .with_for_update(of=other)
    )
    rows = (
        select(
            bindparam(f"{prefix}_id", type_=DELIVERY.c.id.type),
            JOB.c.tenant,
            literal(EventType.batch_completed.value),
            null(),
            JOB.c.batch,
            null(),
            null(),
            null(),
            now,
            literal(DeliveryStatus.pending.value),
            literal(0),
            now,
            now,
        )
        .select_from(JOB.join(ENDPOINT, ENDPOINT.c.tenant == JOB.c.tenant))
        .where(
            and_(JOB.c.id == _job_id(), JOB.c.batch.is_not(None)),
            ~unfinished.exists(),
        )
    )
    return sa_insert(DELIVERY).from_select(_COLUMNS, rows)


_JOB_EVENT = job_event_insert()
_BATCH_EVENT = batch_event_insert()


def event_params(now: datetime, *, prefix: str) -> dict[str, Any]:
    """A fresh delivery id and the event time, for a statement built with `prefix`."""
    return {f"{prefix}_id": uuid.uuid4(), f"{prefix}_now": now}


def record_job_finished(conn: Connection, job_id: uuid.UUID, now: datetime) -> None:
    """After the job's update to succeeded/failed, in its transaction: its event and, if it
    was its batch's last unfinished job, the batch's."""
    conn.execute(_JOB_EVENT, {"jid": job_id, **event_params(now, prefix="wh")})
    conn.execute(_BATCH_EVENT, {"jid": job_id, **event_params(now, prefix="whb")})


def success_ctes(name_prefix: str = "webhook") -> list[Any]:
    """The two inserts as CTEs of the one-statement success (PostgreSQL); parameters
    `wh_*` and `whb_*` (see `event_params`)."""
    job_event = job_event_insert(status=JobStatus.succeeded).cte(f"{name_prefix}_job_event")
    batch_event = batch_event_insert().cte(f"{name_prefix}_batch_event")
    return [job_event, batch_event]
