"""Erasure on request (`macao-ocr erase`): every piece of personal data of some jobs, in ONE
transaction, with an `erased` history event naming who and why.

What goes: the result's personal fields and lookup hashes, the portrait, the job's images
(an image another job still uses stays: `worker.store.retention`), its image URLs and its
kept answer (the table list is `worker.privacy.fields`). What stays: status, codes,
warnings, decision, attempt history, the access log.

An erased job is never called for again: a queued or retrying one ends `failed` with
`Internal.Erased` (its terminal side effects, batch counter and webhook, in the same
transaction), the claim refuses any job with `erased_at`, and replay refuses it. A running
job (a call in flight) is refused: erase it again once its call ends (at most the lease).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobEvent, JobStatus
from models.base import utcnow
from worker.errors import ErasedError, InputError
from worker.store import job_sql
from worker.store.retention import (
    Removed,
    clear_results,
    count_removable,
    delete_job_blobs,
    release_images,
)

log = structlog.get_logger(__name__)

JOB: Table = Job.__table__  # type: ignore[assignment]
ERASED_EVENT = "erased"
WAITING = frozenset({JobStatus.queued, JobStatus.retrying})


@dataclass
class EraseReport:
    """Which jobs matched, which were erased (and which of those were failed), which refused."""

    matched: list[uuid.UUID] = field(default_factory=list)
    erased: list[uuid.UUID] = field(default_factory=list)
    # Queued or retrying jobs that ended failed with Internal.Erased.
    stopped: list[uuid.UUID] = field(default_factory=list)
    refused: dict[uuid.UUID, str] = field(default_factory=dict)
    removed: Removed = field(default_factory=Removed)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The `erase --json` object (job ids and counts, never values)."""
        return {
            "dry_run": self.dry_run,
            "matched": len(self.matched),
            "erased": [str(i) for i in self.erased],
            "stopped": [str(i) for i in self.stopped],
            "refused": [{"job_id": str(i), "reason": r} for i, r in self.refused.items()],
            "removed": self.removed.to_dict(),
        }


def erase(
    session_factory: sessionmaker[Session],
    *,
    tenant: str | None,
    job_ids: Sequence[uuid.UUID] | None = None,
    tag: str | None = None,
    actor: str,
    reason: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> EraseReport:
    """Erase the jobs named by id or tag (of `tenant`; None: every tenant's, an operator's
    session) in one transaction. A dry run counts what would go and changes nothing."""
    if not job_ids and tag is None:
        raise InputError("erase_selection", "name job ids or a tag; erasing all is never implied")
    at = now or utcnow()
    report = EraseReport(dry_run=dry_run)
    query = select(Job)
    if job_ids:
        query = query.where(Job.id.in_(list(dict.fromkeys(job_ids))))
    if tag is not None:
        query = query.where(Job.tag == tag)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    with session_factory() as session, session.begin():
        # Row locks in id order: a claim, a replay or a sweep of these jobs waits for us and
        # then sees them erased.
        jobs = list(session.scalars(query.order_by(Job.id).with_for_update()))
        report.matched = [job.id for job in jobs]
        found = set(report.matched)
        for missing in [i for i in job_ids or () if i not in found]:
            # Another tenant's job reads as not found: its existence is not ours to reveal.
            report.refused[missing] = "not found"
        eligible = []
        for job in jobs:
            if job.status == JobStatus.running:
                report.refused[job.id] = (
                    "running: a call is in flight; erase it again once the call ends"
                )
            else:
                eligible.append(job)
        ids = [job.id for job in eligible]
        report.erased = ids
        report.stopped = [job.id for job in eligible if job.status in WAITING]
        conn = session.connection()
        if dry_run:
            # Nothing changed: the transaction ends with only its row locks to release.
            report.removed = count_removable(conn, images_of=ids, results_of=ids, kept_of=ids)
            return report
        report.removed.add(clear_results(conn, ids, at))
        report.removed.add(delete_job_blobs(conn, ids))
        report.removed.add(release_images(conn, ids, at))
        error = ErasedError()
        for job in eligible:
            session.add(
                JobEvent(
                    job_id=job.id,
                    at=at,
                    kind=ERASED_EVENT,
                    actor=actor,
                    reason=reason,
                    previous_status=job.status.value,
                    previous_error_code=job.last_error_code,
                )
            )
            if job.status in WAITING:
                job_sql.mark_failed(conn, job.id, at, error.code, error.message)
        session.flush()
        if ids:
            conn.execute(update(JOB).where(JOB.c.id.in_(ids)).values(erased_at=at))
    log.info(
        "erased",
        actor=actor,
        matched=len(report.matched),
        erased=len(report.erased),
        refused=len(report.refused),
    )
    return report
