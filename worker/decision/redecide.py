"""`macao-ocr decide`: recompute stored decisions from stored fields and warnings, no API call.

A policy change never rewrites a stored decision by itself; this does, when asked, for a
batch or for the jobs that finished since a time, each job as of the day it was read. A job
whose decision or reasons change gets a `job_event` of kind `decided` (who, why, and the
decision before and after); unchanged jobs are left as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from models import DecisionReason, Job, JobEvent, JobStatus, Result, Warning
from models.base import utcnow
from worker.decision.apply import decide_stored, limits_of
from worker.decision.engine import Decision
from worker.decision.facts import same_image
from worker.decision.policy import Policy, policy_for
from worker.decision.store import load_overrides
from worker.errors import InputError
from worker.privacy.seal import Sealer
from worker.settings import Settings

# The one check that reads the job's images rather than its result (decision/checks.py).
SIDES_IDENTICAL = "sides_identical"

log = structlog.get_logger(__name__)

CHUNK = 500
EVENT_KIND = "decided"


@dataclass
class Change:
    job_id: uuid.UUID
    before: str | None
    after: str
    reasons: list[str]


@dataclass
class DecideReport:
    """What `decide` looked at and what it changed (or, dry, would change)."""

    tenant: str
    matched: int = 0
    changed: list[Change] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The `decide --json` object."""
        return {
            "tenant": self.tenant,
            "dry_run": self.dry_run,
            "matched": self.matched,
            "changed": len(self.changed),
            "jobs": [
                {
                    "job_id": str(c.job_id),
                    "before": c.before,
                    "after": c.after,
                    "reasons": c.reasons,
                }
                for c in self.changed
            ],
        }


def _as_stored(decision: Decision) -> tuple[str, list[tuple[str, str, str]]]:
    return decision.outcome.value, [
        (r.code, r.source.value, r.detail[:200]) for r in decision.reasons
    ]


def _job_ids(
    session: Session, tenant: str, batch: str | None, since: datetime | None
) -> list[uuid.UUID]:
    query = (
        select(Job.id)
        .join(Result, Result.job_id == Job.id)
        .where(Job.tenant == tenant, Job.status == JobStatus.succeeded)
    )
    if batch is not None:
        query = query.where(Job.batch == batch)
    if since is not None:
        query = query.where(Job.finished_at >= since)
    return list(session.scalars(query.order_by(Job.finished_at, Job.id)))


def redecide(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    tenant: str,
    batch: str | None = None,
    since: datetime | None = None,
    actor: str,
    reason: str | None = None,
    dry_run: bool = False,
    sealer: Sealer,
) -> DecideReport:
    """Recompute the decisions of the tenant's succeeded jobs in `batch` and/or finished at
    or after `since` (at least one is required: never everything by accident)."""
    if batch is None and since is None:
        raise InputError("decide_selection", "name a batch or a time (--batch, --since)")
    if since is not None and since.tzinfo is None:
        raise InputError("decide_time", "since needs a time zone (e.g. 2030-01-02T03:04Z)")
    report = DecideReport(tenant=tenant, dry_run=dry_run)
    with session_factory() as session:
        policy = policy_for(
            tenant,
            load_overrides(session.connection(), tenant),
            settings.warning_policy_overrides,
        )
        ids = _job_ids(session, tenant, batch, since)
    report.matched = len(ids)
    for start in range(0, len(ids), CHUNK):
        _chunk(
            session_factory,
            settings,
            sealer,
            policy,
            ids[start : start + CHUNK],
            actor,
            reason,
            report,
        )
    log.info(
        "decide",
        tenant=tenant,
        actor=actor,
        matched=report.matched,
        changed=len(report.changed),
        dry_run=dry_run,
    )
    return report


def _chunk(
    session_factory: sessionmaker[Session],
    settings: Settings,
    sealer: Sealer,
    policy: Policy,
    ids: Sequence[uuid.UUID],
    actor: str,
    reason: str | None,
    report: DecideReport,
) -> None:
    now = utcnow()
    limits = limits_of(settings)
    with session_factory() as session, session.begin():
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        results = session.scalars(
            select(Result).where(Result.job_id.in_(ids)).order_by(Result.job_id).with_for_update()
        ).all()
        warnings: dict[uuid.UUID, list[Warning]] = {}
        for w in session.scalars(
            select(Warning).where(Warning.job_id.in_(ids)).order_by(Warning.id)
        ):
            warnings.setdefault(w.job_id, []).append(w)
        stored: dict[uuid.UUID, list[tuple[str, str, str]]] = {}
        for r in session.scalars(
            select(DecisionReason).where(DecisionReason.job_id.in_(ids)).order_by(DecisionReason.id)
        ):
            stored.setdefault(r.job_id, []).append((r.code, r.source, r.detail))
        for result in results:
            if result.personal_deleted_at is not None:
                # Past its retention the card's values are gone: a decision recomputed from
                # nothing would be about nothing. The one made on the card stands.
                continue
            job = jobs[result.job_id]
            if job.images_deleted_at is not None:
                # The images went with their retention; whether the two sides were one image
                # was seen when they were read, and is kept in the stored reasons.
                sides = any(code == SIDES_IDENTICAL for code, _, _ in stored.get(job.id, []))
            else:
                sides = same_image(
                    sealer.open_url(job.id, "front_url", job.front_url),
                    job.front_image_id,
                    sealer.open_url(job.id, "back_url", job.back_url),
                    job.back_image_id,
                )
            decision = decide_stored(
                result,
                sealer.open_result(result),
                warnings.get(result.job_id, []),
                policy,
                sides_identical=sides,
                limits=limits,
            )
            outcome, rows = _as_stored(decision)
            if (result.decision, stored.get(result.job_id, [])) == (outcome, rows):
                continue
            report.changed.append(
                Change(result.job_id, result.decision, outcome, [code for code, _, _ in rows])
            )
            if report.dry_run:
                continue
            _write(session, result, outcome, rows, now, actor, reason)


def _write(
    session: Session,
    result: Result,
    outcome: str,
    rows: list[tuple[str, str, str]],
    now: datetime,
    actor: str,
    reason: str | None,
) -> None:
    before = result.decision or "none"
    session.execute(delete(DecisionReason).where(DecisionReason.job_id == result.job_id))
    session.add_all(
        DecisionReason(job_id=result.job_id, code=code, source=source, detail=detail)
        for code, source, detail in rows
    )
    result.decision = outcome
    result.decided_at = now
    note = f"decision {before} -> {outcome}"
    session.add(
        JobEvent(
            job_id=result.job_id,
            at=now,
            kind=EVENT_KIND,
            actor=actor,
            reason="; ".join(p for p in (reason, note) if p),
        )
    )
