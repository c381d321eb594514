"""The outbox: a delivery row written in the same transaction as the state change it tells of.

Only for tenants with an endpoint: every statement here selects through `webhook_endpoint`,
so a tenant without one gets no row (and pays one index probe).

`batch.completed` is written by the batch counters' hook (worker.store.terminal): the
transaction that finishes a job moves its batch's counter with an UPDATE ... RETURNING, and
when the row it returns is complete (succeeded + failed = total) writes the event from that
row. One mechanism for `GET /v1/batches/{id}`'s `completed` and for the event. Exactly once
under concurrency: the UPDATE locks the batch row, so of two transactions finishing a
batch's last two jobs at once the second waits for the first's commit and then updates (and
returns) the row with both counts in it; only one of them sees the total reached.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Table,
    Text,
    bindparam,
    case,
    cast,
    func,
    literal,
    null,
    select,
)
from sqlalchemy import insert as sa_insert

from models import (
    Batch,
    DeliveryStatus,
    EventType,
    Job,
    JobStatus,
    WebhookDelivery,
    WebhookEndpoint,
)
from models.base import UTCDateTime

BATCH: Table = Batch.__table__  # type: ignore[assignment]
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


def _batch_row(source: Any, label: Any, where: Any) -> Any:
    """INSERT of `batch.completed` from `source` (the batch table, or the CTE of a counter's
    UPDATE ... RETURNING), when `where` holds and the batch's tenant has an endpoint."""
    now = _at("whb_now")
    rows = (
        select(
            bindparam("whb_id", type_=DELIVERY.c.id.type),
            source.c.tenant,
            literal(EventType.batch_completed.value),
            null(),
            label,
            null(),
            null(),
            null(),
            now,
            literal(DeliveryStatus.pending.value),
            literal(0),
            now,
            now,
        )
        .select_from(source.join(ENDPOINT, ENDPOINT.c.tenant == source.c.tenant))
        .where(where)
    )
    return sa_insert(DELIVERY).from_select(_COLUMNS, rows)


def batch_completed_cte(batch_count: Any, name: str = "webhook_batch_event") -> Any:
    """The `batch.completed` insert as a CTE beside `batch_count` (a counter's UPDATE ...
    RETURNING id, tenant, name, total, succeeded, failed): a row only when that update
    completed the batch. Parameters `whb_*` (see `event_params`). PostgreSQL only."""
    complete = batch_count.c.succeeded + batch_count.c.failed == batch_count.c.total
    label = func.coalesce(batch_count.c.name, cast(batch_count.c.id, Text))
    return _batch_row(batch_count, label, complete).cte(name)


def record_batch_completed(
    conn: Connection, batch_id: uuid.UUID, label: str, now: datetime
) -> None:
    """Write the batch's `batch.completed` (its tenant's endpoint permitting), in the
    transaction whose counter update completed it. `label`: the jobs' `batch` label."""
    conn.execute(
        _BATCH_EVENT,
        {"bid": batch_id, "whb_label": label, **event_params(now, prefix="whb")},
    )


_JOB_EVENT = job_event_insert()
_BATCH_EVENT = _batch_row(
    BATCH,
    bindparam("whb_label", type_=DELIVERY.c.batch.type),
    BATCH.c.id == bindparam("bid", type_=BATCH.c.id.type),
)


def event_params(now: datetime, *, prefix: str) -> dict[str, Any]:
    """A fresh delivery id and the event time, for a statement built with `prefix`."""
    return {f"{prefix}_id": uuid.uuid4(), f"{prefix}_now": now}


def record_job_finished(conn: Connection, job_id: uuid.UUID, now: datetime) -> None:
    """After the job's update to succeeded/failed, in its transaction: its event (its
    batch's, if it completed one, comes from the batch counter: worker.store.terminal)."""
    conn.execute(_JOB_EVENT, {"jid": job_id, **event_params(now, prefix="wh")})


def success_ctes(name_prefix: str = "webhook") -> list[Any]:
    """The job event's insert as a CTE of the one-statement success (PostgreSQL);
    parameters `wh_*` (see `event_params`)."""
    return [job_event_insert(status=JobStatus.succeeded).cte(f"{name_prefix}_job_event")]
