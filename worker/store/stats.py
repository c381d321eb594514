"""The data behind `macao-ocr stats`: one tenant's picture, or every tenant's on request.

The SQL parts (jobs by status, dead letters, calls by outcome, latency) are scoped to one
tenant unless `tenant` is None (the operator's `--all-tenants`). Queue depth, effective rate
and the account pause belong to the shared account and queue, not to a tenant: they carry no
tenant's data and are shown in both.

Jobs by status and dead letters from SQL; queue depth, effective rate and the account pause
from Redis; calls by outcome and latency percentiles over a recent window from the attempt
table. A part that cannot be read (Redis down) is reported as unknown with the reason; the
rest is still shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models import Attempt, Job, JobStatus
from models.base import utcnow
from worker.settings import Settings

DEFAULT_WINDOW_MIN = 15


@dataclass(frozen=True)
class CircuitState:
    open: bool
    code: str | None = None
    message: str | None = None
    since: datetime | None = None


@dataclass
class Stats:
    """One snapshot. None means "could not be read"; `problems` says why."""

    at: datetime
    window_min: int
    jobs_by_status: dict[str, int]
    dead_letters: int
    queue_depth: int | None
    effective_rate: float | None
    quota: float
    circuit: CircuitState | None
    calls_by_outcome: dict[str, int]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    problems: list[str] = field(default_factory=list)
    # Whose jobs the SQL parts count; None: every tenant.
    tenant: str | None = None

    @property
    def calls_in_window(self) -> int:
        return sum(self.calls_by_outcome.values())

    def to_json(self) -> dict[str, Any]:
        """The `stats --json` object."""
        circuit: dict[str, Any] | None = None
        if self.circuit is not None:
            circuit = {
                "open": self.circuit.open,
                "code": self.circuit.code,
                "message": self.circuit.message,
                "since": self.circuit.since.isoformat() if self.circuit.since else None,
            }
        return {
            "at": self.at.isoformat(),
            "tenant": self.tenant,
            "window_min": self.window_min,
            "jobs_by_status": self.jobs_by_status,
            "dead_letters": self.dead_letters,
            "queue_depth": self.queue_depth,
            "effective_rate": self.effective_rate,
            "quota": self.quota,
            "circuit": circuit,
            "calls_in_window": self.calls_in_window,
            "calls_by_outcome": self.calls_by_outcome,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "problems": self.problems,
        }


def _attempts_of(query: Any, tenant: str | None) -> Any:
    if tenant is None:
        return query
    return query.join(Job, Job.id == Attempt.job_id).where(Job.tenant == tenant)


def jobs_by_status(session: Session, tenant: str | None = None) -> dict[str, int]:
    """Every status with its count (zeros included, so the table's shape never changes)."""
    query = sa.select(Job.status, sa.func.count()).group_by(Job.status)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    rows = session.execute(query).all()
    counts = {status.value: 0 for status in JobStatus}
    for status, n in rows:
        counts[JobStatus(status).value] = int(n)
    return counts


def calls_by_outcome(
    session: Session, since: datetime, tenant: str | None = None
) -> dict[str, int]:
    """Finished API calls since `since`, by outcome code, most frequent first."""
    query = (
        sa.select(Attempt.outcome_code, sa.func.count())
        .where(Attempt.finished_at >= since, Attempt.outcome_code.is_not(None))
        .group_by(Attempt.outcome_code)
    )
    rows = session.execute(_attempts_of(query, tenant)).all()
    return {str(code): int(n) for code, n in sorted(rows, key=lambda r: (-r[1], r[0]))}


def latency_percentiles(
    session: Session, since: datetime, tenant: str | None = None
) -> tuple[float | None, float | None]:
    """p50 and p99 of API call latency (ms) since `since`; (None, None) with no calls."""
    where = (Attempt.finished_at >= since, Attempt.latency_ms.is_not(None))
    if session.get_bind().dialect.name == "postgresql":
        # Computed in the database: one row back however many calls the window holds.
        query = sa.select(
            sa.func.percentile_cont(0.5).within_group(Attempt.latency_ms),
            sa.func.percentile_cont(0.99).within_group(Attempt.latency_ms),
        ).where(*where)
        p50, p99 = session.execute(_attempts_of(query, tenant)).one()
        return (None if p50 is None else float(p50), None if p99 is None else float(p99))
    latencies = session.scalars(_attempts_of(sa.select(Attempt.latency_ms).where(*where), tenant))
    values = sorted(float(v) for v in latencies if v is not None)
    return percentile(values, 0.5), percentile(values, 0.99)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (PostgreSQL's percentile_cont) of sorted values."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def queue_depth(redis_url: str) -> int:
    """Messages waiting in the broker queue (every priority list; `worker.broker.queue`)."""
    import redis

    from worker.broker.queue import queue_depth as broker_queue_depth

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return broker_queue_depth(client)
    finally:
        client.close()


def effective_rate(settings: Settings) -> float | None:
    """The shared limiter's current rate (None when it has none stored yet)."""
    from worker.quota.limiter import limiter_key
    from worker.quota.limiter_redis import effective_rate_sync
    from worker.tencent.client import ClientConfig

    config = ClientConfig.from_settings(settings)
    key = limiter_key(config.secret_id, config.action, config.endpoint)
    return effective_rate_sync(settings.state_redis_url, key)


def circuit_state(settings: Settings) -> CircuitState:
    """Whether the account circuit pauses every call, and why."""
    from worker.quota.circuit_redis import read_pause_sync

    pause = read_pause_sync(settings.state_redis_url)
    if pause is None:
        return CircuitState(open=False)
    return CircuitState(open=True, code=pause.code, message=pause.message, since=pause.since)


def _problem(part: str, exc: Exception) -> str:
    # Scrubbed: a connection error's text may carry the Redis URL and its password.
    from worker.errors import MacaoOcrError
    from worker.logs import scrub_text

    detail = str(exc) if isinstance(exc, MacaoOcrError) else f"{type(exc).__name__}: {exc}"
    return f"{part} unknown: {scrub_text(detail)}"


def gather(
    settings: Settings,
    session: Session,
    *,
    window_min: int = DEFAULT_WINDOW_MIN,
    now: datetime | None = None,
    tenant: str | None = None,
) -> Stats:
    """Read every part of the picture (SQL parts for `tenant`, None: all); Redis parts
    degrade to None with a reason."""
    at = now or utcnow()
    since = at - timedelta(minutes=window_min)
    by_status = jobs_by_status(session, tenant)
    p50, p99 = latency_percentiles(session, since, tenant)
    stats = Stats(
        at=at,
        window_min=window_min,
        jobs_by_status=by_status,
        dead_letters=by_status[JobStatus.failed.value],
        queue_depth=None,
        effective_rate=None,
        quota=settings.qps,
        circuit=None,
        calls_by_outcome=calls_by_outcome(session, since, tenant),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        tenant=tenant,
    )
    try:
        stats.queue_depth = queue_depth(settings.broker_url)
    except Exception as exc:
        stats.problems.append(_problem("queue depth", exc))
    try:
        rate = effective_rate(settings)
        # Nothing stored yet: no throttle has lowered it, so it is the configured rate.
        stats.effective_rate = settings.qps if rate is None else rate
    except Exception as exc:
        stats.problems.append(_problem("effective rate", exc))
    try:
        stats.circuit = circuit_state(settings)
    except Exception as exc:
        stats.problems.append(_problem("circuit", exc))
    return stats
