"""Single jobs stored together: the `POST /v1/jobs` requests of the moment share a transaction.

A request validates its job first (every pre-flight rule, in its own thread), then hands the
job in here. While one group's transaction runs, the jobs handed in meanwhile gather; the
first of their threads to find no transaction running stores them all: per tenant one
transaction with the key seals, one query for the images already stored, one multi-row
INSERT for the new images, one for the jobs, and one commit (instead of all of that per
request). After the commits, the group's jobs are published together (`Enqueuer`): enqueue
after commit as everywhere.

One request must not fail the others of its group. A lost idempotency claim (`ClaimLost`:
the key was taken over) is found by its seal's UPDATE, which changes nothing, and only that
job is left out. Any other error rolls the group back and its jobs are stored again one
transaction each, so the error reaches only the request it belongs to.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.orm import Session

from models import Job
from models.base import utcnow
from worker.broker.shared import Combiner
from worker.http import idempotency
from worker.http.enqueue import Enqueuer
from worker.privacy.seal import Sealer
from worker.producer import JOB_TABLE, chunk_images, job_row
from worker.store import batches
from worker.store.engine import TenantSessions
from worker.store.views import new_job_view
from worker.tencent.types import OcrRequest

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class PendingJob:
    """One validated job waiting for its group's commit; `view` or `error` after it."""

    tenant: str
    job_id: uuid.UUID
    request: OcrRequest
    tag: str | None
    batch: str | None
    claim: idempotency.Claim | None = None
    view: dict[str, Any] | None = None
    error: Exception | None = None

    def __repr__(self) -> str:
        # The request holds the card's bytes or URLs.
        return f"PendingJob(job_id={self.job_id})"


class JobGroups:
    """Thread-safe; one per server process."""

    def __init__(self, sessions: TenantSessions, sealer: Sealer, enqueuer: Enqueuer) -> None:
        self.sessions = sessions
        self.sealer = sealer
        self.enqueuer = enqueuer
        self._combiner: Combiner[PendingJob, None] = Combiner(self._flush)

    def store(self, job: PendingJob) -> dict[str, Any]:
        """Commit the job (with the others of the moment), then publish it; its view (with
        `enqueued_at` unless the broker refused it: the sweeper publishes it later). Raises
        what storing it alone raised (`ClaimLost` if its key was taken over)."""
        self._combiner.submit([job])
        if job.error is not None:
            raise job.error
        assert job.view is not None
        return job.view

    def _flush(self, jobs: list[PendingJob]) -> None:
        by_tenant: dict[str, list[PendingJob]] = defaultdict(list)
        for job in jobs:
            by_tenant[job.tenant].append(job)
        for tenant, group in by_tenant.items():
            try:
                self._store(tenant, group)
            except Exception as exc:
                if len(group) == 1:
                    group[0].error = exc
                    continue
                for job in group:
                    try:
                        self._store(tenant, [job])
                    except Exception as alone:
                        job.error = alone
        stored = [job for job in jobs if job.view is not None]
        if not stored:
            return
        # After every commit of the group, and for the group at once: one pipelined publish
        # and one `enqueued_at` UPDATE a tenant, while the next group gathers.
        try:
            enqueued_at = self.enqueuer.enqueue_many([(job.tenant, job.job_id) for job in stored])
        except Exception as exc:
            # Committed all the same: answered as queued, and the sweeper publishes them.
            log.warning("enqueue_failed", jobs=len(stored), error_type=type(exc).__name__)
            enqueued_at = None
        if enqueued_at is not None:
            for job in stored:
                assert job.view is not None
                job.view["enqueued_at"] = enqueued_at.isoformat()

    def _store(self, tenant: str, group: list[PendingJob]) -> None:
        with self.sessions(tenant)() as session, session.begin():
            kept = [job for job in group if _sealed(session, job)]
            if not kept:
                return
            batch_ids = {
                # Sorted: two groups counting into the same labels lock them in one order.
                label: batches.count_into_label(
                    session, tenant, label, sum(job.batch == label for job in kept)
                )
                for label in sorted({job.batch for job in kept if job.batch is not None})
            }
            images = chunk_images(session, self.sealer, tenant, [job.request for job in kept])
            now = utcnow()
            rows = [
                job_row(
                    self.sealer,
                    tenant,
                    job.job_id,
                    job.request,
                    images,
                    job.tag,
                    job.batch,
                    None if job.batch is None else batch_ids[job.batch],
                    now,
                )
                for job in kept
            ]
            session.execute(insert(JOB_TABLE), rows)
        # Committed: the answers are built from the rows written, without reading them back.
        for job, row in zip(kept, rows, strict=True):
            job.view = new_job_view(Job(**row))


def _sealed(session: Session, job: PendingJob) -> bool:
    """Seal the job's key in the group's transaction; False (and ClaimLost on the job) if
    it was taken over, which leaves the rest of the group as it is."""
    job.error = None
    job.view = None
    if job.claim is None:
        return True
    try:
        idempotency.seal(session, job.claim)
    except idempotency.ClaimLost as exc:
        job.error = exc
        return False
    return True
