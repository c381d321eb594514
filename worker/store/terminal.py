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
  returns the batch's row after the change; a batch is complete when succeeded + failed =
  total (`on_batch_completed` is called on the other paths).
- `on_job_reopened(conn, job_id, previous_status)`: a replay took a terminal job back.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, update

from models import Batch, Job, JobStatus

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
        .returning(BATCH.c.id, BATCH.c.total, BATCH.c.succeeded, BATCH.c.failed)
    )


_COUNT_UP = {status: _batch_count(status, 1) for status in _COLUMN}
_COUNT_DOWN = {status: _batch_count(status, -1) for status in _COLUMN}


def terminal_ctes(status: JobStatus) -> list[Any]:
    """The CTEs a one-statement transition to `status` adds (PostgreSQL): the batch count."""
    return [_COUNT_UP[status].cte("batch_count")]


def on_job_terminal(conn: Connection, job_id: uuid.UUID, status: JobStatus) -> None:
    """The job just became `status` (succeeded/failed) in this transaction."""
    row = conn.execute(_COUNT_UP[status], {"jid": job_id}).first()
    if row is not None and row.succeeded + row.failed == row.total:
        on_batch_completed(conn, row.id)


def on_job_reopened(conn: Connection, job_id: uuid.UUID, previous_status: JobStatus) -> None:
    """A replay took the job from `previous_status` (succeeded/failed) back to queued."""
    if previous_status in _COLUMN:
        conn.execute(_COUNT_DOWN[previous_status], {"jid": job_id})


def on_batch_completed(conn: Connection, batch_id: uuid.UUID) -> None:
    """Every job of the batch is terminal (called in the transaction that made it so).

    Nothing to do for the counters themselves; the place for a `batch.completed` event."""
