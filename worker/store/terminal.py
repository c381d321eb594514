"""What changes with a job's terminal status, in the same transaction as the status itself.

A job that reaches `succeeded` or `failed` moves its batch's counter (`batch.succeeded` or
`batch.failed`, so `GET /v1/batches/{id}` reads one row); a replay that sends it round again
moves the counter back. This module is the ONE hook for such side effects (the webhooks
outbox adds its rows here):

- `on_job_terminal(conn, job_id, status)`: called by every multi-statement path that makes
  a job terminal (`job_sql.mark_failed`, `mark_already_succeeded`, SQLite's `store_success`,
  the sweeper), inside the caller's transaction.
- `terminal_ctes(status)`: the same effects as data-modifying CTEs, for PostgreSQL's
  one-statement success (`job_sql.store_success` runs outside a transaction there, so a
  side effect must be part of that statement to be atomic with it). The `batch_count` CTE
  returns the batch's row after the change, and a sibling CTE writes `batch.completed` from
  it when that change completed the batch.
- `on_job_reopened(conn, job_id, previous_status)`: a replay took a terminal job back.

A batch is complete when succeeded + failed = total, judged on the row the counter's UPDATE
returns: that UPDATE locks the row, so when two transactions finish a batch's last two jobs
at once the second waits for the first's commit, then returns the row with both counts.
Exactly one of them sees the total reached and writes the batch's webhook event (the
`batch.completed` of worker.webhooks.outbox): one completion mechanism for the API's
`completed` and for the event. A replayed job takes its count back; when it finishes again
its batch completes (and is told) again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Table, bindparam, select, update

from models import Batch, Job, JobStatus
from models.base import utcnow
from worker.webhooks import outbox

BATCH: Table = Batch.__table__  # type: ignore[assignment]
JOB: Table = Job.__table__  # type: ignore[assignment]

_COLUMN = {JobStatus.succeeded: "succeeded", JobStatus.failed: "failed"}


def _batch_count(status: JobStatus, delta: int) -> Any:
    """UPDATE of the counter of the batch of the job named by the `jid` parameter."""
    column = BATCH.c[_COLUMN[status]]
    job_batch = select(JOB.c.batch_id).where(JOB.c.id == bindparam("jid", type_=JOB.c.id.type))
    return (
        update(BATCH)
        .where(BATCH.c.id == job_batch.scalar_subquery())
        .values({column: column + delta})
        .returning(
            BATCH.c.id,
            BATCH.c.tenant,
            BATCH.c.name,
            BATCH.c.total,
            BATCH.c.succeeded,
            BATCH.c.failed,
        )
    )


_COUNT_UP = {status: _batch_count(status, 1) for status in _COLUMN}
_COUNT_DOWN = {status: _batch_count(status, -1) for status in _COLUMN}


def terminal_ctes(status: JobStatus) -> list[Any]:
    """The CTEs a one-statement transition to `status` adds (PostgreSQL): the batch count,
    and the batch's webhook event when it completes (parameters `whb_*`:
    `outbox.event_params(now, prefix="whb")`)."""
    count = _COUNT_UP[status].cte("batch_count")
    return [count, outbox.batch_completed_cte(count)]


def on_job_terminal(
    conn: Connection, job_id: uuid.UUID, status: JobStatus, *, now: datetime | None = None
) -> None:
    """The job just became `status` (succeeded/failed) in this transaction (at `now`)."""
    row = conn.execute(_COUNT_UP[status], {"jid": job_id}).first()
    if row is not None and row.succeeded + row.failed == row.total:
        on_batch_completed(conn, row, now or utcnow())


def on_job_reopened(conn: Connection, job_id: uuid.UUID, previous_status: JobStatus) -> None:
    """A replay took the job from `previous_status` (succeeded/failed) back to queued."""
    if previous_status in _COLUMN:
        conn.execute(_COUNT_DOWN[previous_status], {"jid": job_id})


def on_batch_completed(conn: Connection, batch: Row[Any], now: datetime) -> None:
    """Every job of the batch is terminal (called in the transaction that made it so, with
    the counter's returned row): its `batch.completed` event. The event names the batch by
    its jobs' `batch` label: the name, or for an unnamed API batch its id."""
    outbox.record_batch_completed(conn, batch.id, batch.name or str(batch.id), now)
