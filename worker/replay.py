"""Replaying dead letters: failed jobs go round again, through the same queue and quota.

A failed job keeps its whole history. A replay gives it a fresh failure budget (attempts=0)
but deletes nothing of its past: Attempt rows stay (new calls continue the numbering) and a
JobEvent(kind="replay") records who, why, and the status and error code it had. The reset
is committed before the ids are published, like any submit.

A failed job whose answer was kept (a poison job: the API answered, storing failed; see
`worker.store.kept`) is not sent round again: its kept answer is stored in the same
transaction, with no API call, and the job succeeds (`ReplayReport.stored`). If it still
cannot be stored, the job is refused with the reason and keeps its answer.

A succeeded job is refused unless `force` (we would pay for a result we already hold); with
force its result, warnings and portrait are deleted in the same transaction. Jobs still in
flight (queued, running, retrying) are refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobEvent, JobStatus, KeptAnswer, Portrait, Result, Warning
from models.base import utcnow
from worker.broker.publish import Publisher
from worker.errors import InputError, ReplayRefused, StoreFailed
from worker.privacy.seal import Sealer
from worker.settings import Settings
from worker.store import kept, terminal
from worker.store.filters import JobFilter

log = structlog.get_logger(__name__)

CHUNK = 500
FORCED_NOTE = "forced: previous result, warnings and portrait deleted"
KEPT_NOTE = "stored from the kept answer (no new call)"
IN_FLIGHT = frozenset({JobStatus.queued, JobStatus.running, JobStatus.retrying})
REFUSED_ERASED = "Replay.Erased"
REFUSED_IN_FLIGHT = "Replay.InFlight"
REFUSED_SUCCEEDED = "Replay.Succeeded"
REFUSED_IMAGES_DELETED = "Replay.ImagesDeleted"
REFUSED_NOT_FOUND = "Replay.NotFound"
REFUSED_NO_MATCH = "Replay.NoMatch"
REFUSED_KEPT = "Replay.KeptAnswerUnstorable"


@dataclass
class ReplayReport:
    """Which jobs matched, which were replayed, which were refused and why."""

    matched: list[uuid.UUID] = field(default_factory=list)
    replayed: list[uuid.UUID] = field(default_factory=list)
    refused: dict[uuid.UUID, str] = field(default_factory=dict)
    # The code of each refusal (`Replay.ImagesDeleted`, `Replay.Erased`...: ReplayRefused).
    refused_codes: dict[uuid.UUID, str] = field(default_factory=dict)
    # Replayed jobs stored from their kept answer, without a call (and not published).
    stored: list[uuid.UUID] = field(default_factory=list)
    # The last error code of every matched job (what a dry run lists).
    error_codes: dict[uuid.UUID, str | None] = field(default_factory=dict)
    dry_run: bool = False
    # False when the broker could not take the ids: the jobs are queued anyway and the
    # sweeper publishes them.
    published: bool = True

    def refuse(self, job_id: uuid.UUID, why: ReplayRefused) -> None:
        """Record a refusal with its code."""
        self.refused[job_id] = why.message
        self.refused_codes[job_id] = why.code

    def to_dict(self) -> dict[str, Any]:
        """The `replay --json` object."""
        return {
            "dry_run": self.dry_run,
            "matched": len(self.matched),
            "replayed": [str(i) for i in self.replayed],
            "stored_without_call": [str(i) for i in self.stored],
            "refused": [
                {"job_id": str(i), "code": self.refused_codes.get(i), "reason": r}
                for i, r in self.refused.items()
            ],
            "jobs": [
                {"job_id": str(i), "error_code": self.error_codes.get(i)} for i in self.matched
            ],
            # How many messages went to the broker: none on a dry run.
            "published": 0 if self.dry_run or not self.published else len(self.replayed),
            # The broker could not take them: queued anyway, the sweeper publishes them.
            "publish_failed": not self.dry_run and not self.published,
        }


def refusal(job: Job, *, force: bool) -> ReplayRefused | None:
    """Why this job may not be replayed (a code and a message), or None when it may."""
    if job.erased_at is not None:
        return ReplayRefused("erased on request: it is never called for again", code=REFUSED_ERASED)
    if job.status in IN_FLIGHT:
        return ReplayRefused(
            f"already in flight (status {job.status.value})", code=REFUSED_IN_FLIGHT
        )
    if job.status == JobStatus.succeeded and not force:
        return ReplayRefused(
            "succeeded: replaying would pay for its result again (use --force)",
            code=REFUSED_SUCCEEDED,
        )
    if job.images_deleted_at is not None:
        return ReplayRefused(
            "its card images and image URLs were deleted by retention "
            "(MACAO_OCR_IMAGE_RETENTION_S / MACAO_OCR_FAILED_IMAGE_RETENTION_S): there is "
            "nothing to send; submit the card again",
            code=REFUSED_IMAGES_DELETED,
        )
    return None


def _parse_status(status: str | JobStatus | None) -> JobStatus | None:
    if status is None or isinstance(status, JobStatus):
        return status
    try:
        return JobStatus(status)
    except ValueError:
        names = ", ".join(s.value for s in JobStatus)
        raise InputError("replay_status", f"status must be one of {names}") from None


def _select(
    tenant: str | None,
    job_ids: Sequence[uuid.UUID] | None,
    status: JobStatus | None,
    error_code: str | None,
    batch: str | None,
    since: datetime | None,
    until: datetime | None,
    batch_id: uuid.UUID | None = None,
) -> Any:
    matching = JobFilter(
        tenant=tenant,
        job_ids=job_ids,
        status=status,
        error_code=error_code,
        batch=batch,
        batch_id=batch_id,
        finished_since=since,
        finished_until=until,
    )
    return matching.select().order_by(Job.created_at, Job.id)


def replay(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    *,
    job_ids: Sequence[uuid.UUID] | None = None,
    status: str | JobStatus | None = None,
    error_code: str | None = None,
    batch: str | None = None,
    batch_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str,
    reason: str | None,
    force: bool = False,
    dry_run: bool = False,
    all_tenants: bool = False,
    sealer: Sealer,
) -> ReplayReport:
    """Queue matching failed (or, with force, succeeded) jobs again; see the module doc.

    With no ids, the filters select the jobs and status defaults to failed; with neither,
    InputError (never replay everything by accident). Scoped to settings.tenant unless
    `all_tenants` (an operator's replay; its session factory must see every tenant).
    """
    filtered = any(v is not None for v in (status, error_code, batch, batch_id, since, until))
    if not job_ids and not filtered:
        raise InputError(
            "replay_selection", "name job ids or a filter (status, error code, batch, since, until)"
        )
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InputError("replay_time", f"{name} needs a time zone (e.g. 2030-01-02T03:04Z)")
    wanted = _parse_status(status)
    if not job_ids and wanted is None:
        wanted = JobStatus.failed
    ids = list(dict.fromkeys(job_ids)) if job_ids else None

    tenant = None if all_tenants else settings.tenant
    report = ReplayReport(dry_run=dry_run)
    with session_factory() as session:
        jobs = session.scalars(
            _select(tenant, ids, wanted, error_code, batch, since, until, batch_id)
        )
        eligible: list[uuid.UUID] = []
        for job in jobs:
            report.matched.append(job.id)
            report.error_codes[job.id] = job.last_error_code
            why = refusal(job, force=force)
            if why is None:
                eligible.append(job.id)
            else:
                report.refuse(job.id, why)
        if ids is not None:
            _explain_unmatched(session, tenant, ids, set(report.matched), report)
    if dry_run:
        report.replayed = eligible
        with session_factory() as session:
            report.stored = _with_kept_answer(session, eligible)
        return report

    for start in range(0, len(eligible), CHUNK):
        chunk = _reset(
            session_factory, sealer, eligible[start : start + CHUNK], actor, reason, force, report
        )
        if not chunk:
            continue
        report.replayed.extend(chunk)
        if report.published:
            report.published = _publish(session_factory, publisher, chunk)
    log.info(
        "replay",
        actor=actor,
        matched=len(report.matched),
        replayed=len(report.replayed),
        refused=len(report.refused),
        forced=force,
        published=report.published,
    )
    return report


def _explain_unmatched(
    session: Session,
    tenant: str | None,
    ids: Sequence[uuid.UUID],
    matched: set[uuid.UUID],
    report: ReplayReport,
) -> None:
    missing = [i for i in ids if i not in matched]
    if not missing:
        return
    query = select(Job.id).where(Job.id.in_(missing))
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    existing = set(session.scalars(query))
    for job_id in missing:
        # Another tenant's job reads as not found: its existence is not ours to reveal.
        why = (
            ReplayRefused("does not match the filters", code=REFUSED_NO_MATCH)
            if job_id in existing
            else ReplayRefused("not found", code=REFUSED_NOT_FOUND)
        )
        report.refuse(job_id, why)


def _with_kept_answer(session: Session, ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Those of `ids` that have a kept answer, in the order given."""
    found: set[uuid.UUID] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        found.update(session.scalars(select(KeptAnswer.job_id).where(KeptAnswer.job_id.in_(chunk))))
    return [i for i in ids if i in found]


def _replay_event(
    job: Job, now: datetime, actor: str, reason: str | None, note: str | None
) -> JobEvent:
    """The job's `replay` event: who, why (the operator's reason, then what the replay did),
    and the status and error code it had. Built before the job is reset."""
    return JobEvent(
        job_id=job.id,
        at=now,
        kind="replay",
        actor=actor,
        reason="; ".join(p for p in (reason, note) if p) or None,
        previous_status=job.status.value,
        previous_error_code=job.last_error_code,
    )


def _store_kept(
    session: Session, sealer: Sealer, job: Job, now: datetime, actor: str, reason: str | None
) -> str | None:
    """Store a poison job's kept answer (no call), with its replay event, in a savepoint;
    None when stored, else why not (nothing of it then holds)."""
    try:
        with session.begin_nested():
            conn = session.connection()
            conn.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(attempts=0, last_error_code=None, last_error_message=None)
            )
            kept.store_kept(conn, job.id, portrait=job.portrait, now=now, sealer=sealer)
            session.add(_replay_event(job, now, actor, reason, KEPT_NOTE))
    except StoreFailed as err:
        return f"its kept answer still cannot be {err.stage}d ({err.reason}); it stays kept"
    return None


def _reset(
    session_factory: sessionmaker[Session],
    sealer: Sealer,
    ids: Sequence[uuid.UUID],
    actor: str,
    reason: str | None,
    force: bool,
    report: ReplayReport,
) -> list[uuid.UUID]:
    """Reset one chunk in one transaction, re-checking each job under its row lock."""
    now = utcnow()
    done: list[uuid.UUID] = []
    with session_factory() as session, session.begin():
        jobs = session.scalars(
            select(Job).where(Job.id.in_(ids)).order_by(Job.id).with_for_update()
        ).all()
        with_answer = set(_with_kept_answer(session, [job.id for job in jobs]))
        for job in jobs:
            why = refusal(job, force=force)
            if why is not None:  # it changed since we matched it
                report.refuse(job.id, why)
                continue
            if job.id in with_answer:
                unstored = _store_kept(session, sealer, job, now, actor, reason)
                if unstored is not None:
                    report.refuse(job.id, ReplayRefused(unstored, code=REFUSED_KEPT))
                else:
                    report.stored.append(job.id)
                    report.replayed.append(job.id)
                continue
            forced = job.status == JobStatus.succeeded
            if forced:
                session.execute(delete(Portrait).where(Portrait.job_id == job.id))
                session.execute(delete(Warning).where(Warning.job_id == job.id))
                session.execute(delete(Result).where(Result.job_id == job.id))
            session.add(_replay_event(job, now, actor, reason, FORCED_NOTE if forced else None))
            terminal.on_job_reopened(session.connection(), job.id, job.status)
            job.status = JobStatus.queued
            job.attempts = 0
            job.next_attempt_at = None
            job.finished_at = None
            job.started_at = None
            job.lease_expires_at = None
            job.enqueued_at = None
            job.last_error_code = None
            job.last_error_message = None
            done.append(job.id)
    return done


def _publish(
    session_factory: sessionmaker[Session], publisher: Publisher, ids: Sequence[uuid.UUID]
) -> bool:
    """Publish after the commit; a broker outage leaves the jobs to the sweeper."""
    try:
        publisher.publish(ids)
    except Exception as exc:
        log.warning("replay_publish_failed", jobs=len(ids), error=type(exc).__name__)
        return False
    with session_factory() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.queued, Job.enqueued_at.is_(None))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return True
