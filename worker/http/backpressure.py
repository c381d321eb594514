"""Backpressure: refuse new jobs (429) while a tenant's backlog would take longer than
`max_backlog_s` to drain at the account's quota (`qps`; 0 switches the limiter, and this,
off). The count is bounded (it stops past the limit) and cached a second per process, so a
busy intake does not count a deep backlog on every request."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobStatus
from worker.http.problems import ProblemError
from worker.settings import Settings

IN_FLIGHT = (JobStatus.queued, JobStatus.running, JobStatus.retrying)
CACHE_S = 1.0


class Backlog:
    """Per-tenant backlog counts, shared by a process's request threads."""

    def __init__(
        self, settings: Settings, sessions: Callable[[str], sessionmaker[Session]]
    ) -> None:
        self.qps = settings.qps
        self.max_backlog_s = settings.max_backlog_s
        # The tenant's own sessions: counted behind the tenant wall.
        self.sessions = sessions
        self._cache: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._counting: set[str] = set()

    @property
    def limit(self) -> int:
        """Jobs the quota drains in max_backlog_s."""
        return math.floor(self.qps * self.max_backlog_s)

    def _count(self, tenant: str) -> int:
        inner = (
            select(Job.id)
            .where(Job.tenant == tenant, Job.status.in_(IN_FLIGHT))
            .limit(self.limit + 1)
            .subquery()
        )
        with self.sessions(tenant)() as session:
            return int(session.scalar(select(func.count()).select_from(inner)) or 0)

    def admit(self, tenant: str, jobs: int) -> None:
        """Raise 429 (with Retry-After) if `jobs` more would overfill the tenant's backlog."""
        if self.qps <= 0:
            return
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant)
            # One thread recounts an expired count; the others go on with the old one
            # meanwhile (at most a count's duration older) instead of all counting at once.
            recount = (cached is None or now - cached[0] > CACHE_S) and (
                cached is None or tenant not in self._counting
            )
            if recount:
                self._counting.add(tenant)
        if recount:
            try:
                cached = (now, self._count(tenant))
            finally:
                with self._lock:
                    self._counting.discard(tenant)
        assert cached is not None
        backlog = cached[1]
        if backlog + jobs > self.limit:
            wait_s = math.ceil((backlog + jobs - self.limit) / self.qps)
            raise ProblemError(
                429,
                "backlog_full",
                "Too many jobs waiting",
                f"the tenant's backlog would take over {self.max_backlog_s:g} s at the "
                f"current quota of {self.qps:g} calls/s",
                headers={"Retry-After": str(max(1, wait_s))},
            )
        with self._lock:
            # Counted in at once: the next request of this second sees these jobs.
            self._cache[tenant] = (cached[0], backlog + jobs)
