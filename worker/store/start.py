"""A job's start: the claim, the lost attempts a dead worker left, and the first attempt opened.

One entry point whatever the database: on PostgreSQL a plain start (due, no attempt left open,
no result stored) is ONE statement run with no transaction around it; any other start, and
every start elsewhere, is one transaction, so if any part fails none of it holds and the
message is simply delivered again.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from worker.errors import WorkerLostError
from worker.privacy.seal import Sealer
from worker.store import job_sql

ConnectionScope = Callable[[], AbstractContextManager[Connection]]


class NotStarted(enum.StrEnum):
    """Why a start opened no attempt."""

    not_claimed = "not_claimed"  # a duplicate or early message: someone else has it
    already_succeeded = "already_succeeded"  # a result is stored: never bought twice
    failed = "failed"  # its worker was lost max_worker_lost times: failed, no call


@dataclass(frozen=True)
class Started:
    """The claimed job with its attempt `number` opened (and counted as a call)."""

    claimed: job_sql.Claimed
    attempts: int  # budget spent, lost attempts of a dead worker included
    number: int


def start_job(
    job_id: uuid.UUID,
    *,
    statement: ConnectionScope | None,
    transaction: ConnectionScope,
    now: datetime,
    lease_until: datetime,
    host: str,
    sealer: Sealer,
    max_worker_lost: int | None = None,
    inline_max: int = job_sql.NO_INLINE_LIMIT,
) -> Started | NotStarted:
    """Claim `job_id` and open its next attempt. `statement` (PostgreSQL only) runs one
    statement with no transaction around it; None: every start is a transaction.

    Taking over a dead worker's lease counts its lost attempt; at `max_worker_lost` the job
    fails as Internal.WorkerLost instead (as the sweeper would). Images over `inline_max`
    bytes are left out of the claim (see `job_sql.claim`)."""
    if statement is not None:
        with statement() as conn:
            plain = job_sql.claim_plain(
                conn,
                job_id,
                now=now,
                lease_until=lease_until,
                host=host,
                sealer=sealer,
                inline_max=inline_max,
            )
        if plain is not None:
            return Started(plain, plain.attempts, plain.last_number + 1)
    with transaction() as conn:
        claimed = job_sql.claim(
            conn,
            job_id,
            now=now,
            lease_until=lease_until,
            host=host,
            sealer=sealer,
            open_attempt=True,
            inline_max=inline_max,
        )
        if claimed is None:
            return NotStarted.not_claimed
        attempts = claimed.attempts
        if claimed.open_attempts:
            # We took a dead worker's expired lease: close its call as the sweeper would,
            # spending budget so a poison job ends.
            attempts += job_sql.close_lost_attempts(conn, job_id, now)
            lost = job_sql.count_lost(conn, job_id, since=claimed.started_at)
            if max_worker_lost is not None and lost >= max_worker_lost and not claimed.bought:
                error = WorkerLostError(lost)
                job_sql.uncount_call(conn, job_id)
                job_sql.mark_failed(conn, job_id, now, error.code, error.message)
                return NotStarted.failed
        if claimed.bought:
            # Bought already (a crash between finalize and ack, or a replayed message).
            job_sql.mark_already_succeeded(conn, job_id, now)
            return NotStarted.already_succeeded
        number = claimed.last_number + 1
        if not claimed.opened:
            job_sql.insert_attempt(conn, job_id, number, now=now, host=host)
        return Started(claimed, attempts, number)


def refuse_start(
    conn: Connection, job_id: uuid.UUID, number: int, now: datetime, code: str, message: str
) -> None:
    """A started job whose input is refused before any call: its attempt undone, the job
    failed with the rule's code. (Killed before this runs, the sweeper closes the attempt as
    lost when the lease expires.)"""
    job_sql.drop_attempt(conn, job_id, number)
    job_sql.mark_failed(conn, job_id, now, code, message)
