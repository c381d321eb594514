"""The access log: who was shown a result's personal fields, of which job, when, and how.

One row per job per read, written by the read itself (the CLI's `status`, `jobs --json` and
`read`, the HTTP API's job, list and portrait) in its own short transaction before the data
is shown: a read that cannot be logged shows nothing. Only reads that show personal fields
are logged: a job without a result, or whose personal fields retention or erasure deleted,
shows none. Behind the tenant wall (its `tenant` column); `macao-ocr audit` lists it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccessLog, Portrait, Result
from models.base import utcnow

ACCESS: Table = AccessLog.__table__  # type: ignore[assignment]

# How a read was made (`access_log.how`).
CLI_STATUS = "cli.status"
CLI_JOBS = "cli.jobs"
CLI_READ = "cli.read"
API_JOB = "api.job"
API_JOBS = "api.jobs"
API_PORTRAIT = "api.portrait"
PYTHON_GET_JOB = "python.get_job"


def process_actor() -> str:
    """Who runs this process, as history events and the access log name them: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Read:
    """One job shown to `actor` (job None: a local file read through the API)."""

    tenant: str
    job_id: uuid.UUID | None


def with_personal_fields(session: Session, job_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Those of the jobs whose result still holds its personal fields."""
    ids = list(job_ids)
    if not ids:
        return set()
    return set(
        session.scalars(
            select(Result.job_id).where(
                Result.job_id.in_(ids), Result.personal_deleted_at.is_(None)
            )
        )
    )


def with_portrait(session: Session, job_id: uuid.UUID) -> bool:
    """Whether the job has a portrait to show."""
    return session.get(Portrait, job_id) is not None


def record(
    session_factory: sessionmaker[Session],
    *,
    actor: str,
    how: str,
    reads: Sequence[Read],
    at: datetime | None = None,
) -> None:
    """Write one access_log row per read, committed before the caller shows anything."""
    if not reads:
        return
    when = at or utcnow()
    rows = [
        {"at": when, "actor": actor[:200], "tenant": r.tenant, "job_id": r.job_id, "how": how}
        for r in reads
    ]
    with session_factory() as session, session.begin():
        session.execute(insert(ACCESS), rows)


def entries(
    session: Session,
    *,
    tenant: str | None,
    job_id: uuid.UUID | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest `limit` rows (of `tenant`; None: every tenant's), newest first."""
    query = select(AccessLog)
    if tenant is not None:
        query = query.where(AccessLog.tenant == tenant)
    if job_id is not None:
        query = query.where(AccessLog.job_id == job_id)
    if since is not None:
        query = query.where(AccessLog.at >= since)
    query = query.order_by(AccessLog.at.desc(), AccessLog.id.desc()).limit(limit)
    return [
        {
            "at": row.at.isoformat(),
            "actor": row.actor,
            "tenant": row.tenant,
            "job_id": None if row.job_id is None else str(row.job_id),
            "how": row.how,
        }
        for row in session.scalars(query)
    ]
