"""Publishing single jobs for a busy server: requests handed in while a publish is under way
go out together, and their `enqueued_at` is recorded with one UPDATE per tenant (in that
tenant's session) instead of a transaction per request.

Enqueue-after-commit as everywhere: a request hands in its job only after its commit. A
request returns once its job is published and recorded; if the broker refused, nothing is
recorded (logged, not raised) and the sweeper publishes the job later, as for the producer.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime

import structlog
from sqlalchemy import update

from models import Job
from models.base import utcnow
from worker.broker.publish import Publisher
from worker.broker.shared import Combiner
from worker.store.engine import TenantSessions

log = structlog.get_logger(__name__)


class Enqueuer:
    """Thread-safe; one per server process."""

    def __init__(self, publisher: Publisher, sessions: TenantSessions) -> None:
        self.publisher = publisher
        self.sessions = sessions
        self._combiner: Combiner[tuple[str, uuid.UUID], datetime | None] = Combiner(self._flush)

    def enqueue(self, tenant: str, job_id: uuid.UUID) -> datetime | None:
        """Publish a committed job; when its `enqueued_at` was recorded (None: the broker
        refused it, the sweeper will publish it)."""
        return self._combiner.submit([(tenant, job_id)])

    def enqueue_many(self, jobs: list[tuple[str, uuid.UUID]]) -> datetime | None:
        """`enqueue` for committed jobs of any tenants, (tenant, job id) each: one publish."""
        return self._combiner.submit(jobs)

    def _flush(self, items: list[tuple[str, uuid.UUID]]) -> datetime | None:
        ids = [job_id for _, job_id in items]
        try:
            self.publisher.publish(ids)
        except Exception as exc:
            # Only the type: a broker error's text may hold the broker URL and its password.
            log.warning("publish_failed", jobs=len(ids), error_type=type(exc).__name__)
            return None
        now = utcnow()
        by_tenant: dict[str, list[uuid.UUID]] = defaultdict(list)
        for tenant, job_id in items:
            by_tenant[tenant].append(job_id)
        for tenant, tenant_ids in by_tenant.items():
            with self.sessions(tenant)() as session, session.begin():
                session.execute(
                    update(Job)
                    .where(Job.id.in_(tenant_ids), Job.enqueued_at.is_(None))
                    .values(enqueued_at=now)
                    .execution_options(synchronize_session=False)
                )
        return now
