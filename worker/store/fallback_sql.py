"""The SQL the DownLoadError budget and the URL fallback need (rare path: plain statements)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

from sqlalchemy import Connection, Table, func, insert, select

from models import Attempt, JobEvent

ATTEMPT: Table = Attempt.__table__  # type: ignore[assignment]
JOB_EVENT: Table = JobEvent.__table__  # type: ignore[assignment]

DOWNLOAD_ERROR: Final = "FailedOperation.DownLoadError"
FALLBACK_EVENT: Final = "url_fallback"


def download_errors(conn: Connection, job_id: uuid.UUID) -> int:
    """DownLoadError answers already recorded for the job (closed attempts)."""
    count = conn.execute(
        select(func.count()).where(
            ATTEMPT.c.job_id == job_id, ATTEMPT.c.outcome_code == DOWNLOAD_ERROR
        )
    ).scalar_one()
    return int(count)


def fallback_used(conn: Connection, job_id: uuid.UUID) -> bool:
    """Whether the worker already fetched this job's URL itself (it does so once)."""
    found = conn.execute(
        select(JOB_EVENT.c.id)
        .where(JOB_EVENT.c.job_id == job_id, JOB_EVENT.c.kind == FALLBACK_EVENT)
        .limit(1)
    ).first()
    return found is not None


def record_fallback(conn: Connection, job_id: uuid.UUID, at: datetime, reason: str) -> None:
    """The job's history says the image went inline after our own fetch (never the URL)."""
    conn.execute(
        insert(JOB_EVENT).values(
            job_id=job_id,
            at=at,
            kind=FALLBACK_EVENT,
            actor="worker",
            reason=reason,
            previous_error_code=DOWNLOAD_ERROR,
        )
    )
