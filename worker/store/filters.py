"""Which jobs a command means: one filter, shared by `jobs` (listing) and `replay`.

A filter is scoped to one tenant unless its tenant is None (an operator's `--all-tenants`):
no caller lists or replays across tenants by accident.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from models import DecisionReason, Job, JobStatus, Result


@dataclass(frozen=True)
class JobFilter:
    """Conditions on a tenant's jobs; None means "any". The time window is on when the job
    finished ("what failed during the outage")."""

    tenant: str | None
    job_ids: Sequence[uuid.UUID] | None = None
    status: JobStatus | None = None
    error_code: str | None = None
    batch: str | None = None
    batch_id: uuid.UUID | None = None
    tag: str | None = None
    finished_since: datetime | None = None
    finished_until: datetime | None = None
    decision: str | None = None  # clear | consider | reject (succeeded jobs only)
    reason: str | None = None  # one of the decision's reason codes

    def conditions(self) -> list[Any]:
        """The WHERE clauses, for a query over `Job`."""
        # Kept beside PostgreSQL's row-level security: SQLite has no wall.
        where: list[Any] = [] if self.tenant is None else [Job.tenant == self.tenant]
        if self.job_ids is not None:
            where.append(Job.id.in_(self.job_ids))
        if self.status is not None:
            where.append(Job.status == self.status)
        if self.error_code is not None:
            where.append(Job.last_error_code == self.error_code)
        if self.batch is not None:
            where.append(Job.batch == self.batch)
        if self.batch_id is not None:
            where.append(Job.batch_id == self.batch_id)
        if self.tag is not None:
            where.append(Job.tag == self.tag)
        if self.finished_since is not None:
            where.append(Job.finished_at >= self.finished_since)
        if self.finished_until is not None:
            where.append(Job.finished_at < self.finished_until)
        if self.decision is not None:
            decided = select(Result.job_id).where(
                Result.job_id == Job.id, Result.decision == self.decision
            )
            where.append(decided.exists())
        if self.reason is not None:
            has_reason = select(DecisionReason.id).where(
                DecisionReason.job_id == Job.id, DecisionReason.code == self.reason
            )
            where.append(has_reason.exists())
        return where

    def select(self) -> Any:
        """SELECT the matching jobs (unordered)."""
        return select(Job).where(*self.conditions())
