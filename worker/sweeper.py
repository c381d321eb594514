"""The sweeper: the database is the source of truth, the broker only a doorbell.

Every `sweep_interval_s` one process of the fleet (leader-elected through a Redis lock with a
TTL) rings the doorbell again for every job that needs it, so no job stays queued or running
forever:

1. due retries: `retrying` jobs whose `next_attempt_at` has come and that were not published
   since (retries are scheduled in SQL, never with Celery ETAs);
2. never published: `queued` jobs with no `enqueued_at` a few seconds after creation (the
   producer died between its commit and its publish, or the broker was down at submit);
3. lost messages: this Redis keeps nothing on disk, so a restart empties the queue. A broker
   epoch key vanishing, or fewer messages in the broker (its queue lists + `unacked` hash,
   read through `worker.broker.queue`)
   than jobs waiting for one, triggers a scan of the broker; only waiting jobs whose message
   is not there are published again (duplicates are harmless, the pipeline claims atomically,
   but we don't flood);
4. dead workers: `running` jobs whose lease expired get their open attempt closed as
   `WorkerLost` (a budget attempt, so a job that kills its worker cannot loop forever) and go
   back to `retrying`, due now; rule 1 of the same sweep publishes them (or fail, with their
   webhook outbox rows in the same transaction);
5. webhooks: deliveries due in the outbox (new, due for a retry, or their message lost) get
   a message on the webhook queue (worker.webhooks.dispatch);
6. retention: personal data whose time is up is deleted (worker.store.retention), at most
   one batch of each kind per sweep: a succeeded job's images and URLs (by default at the
   first sweep after its success), a failed job's after MACAO_OCR_FAILED_IMAGE_RETENTION_S,
   a result's personal fields and portrait after MACAO_OCR_RESULT_RETENTION_S.

State changes are committed BEFORE anything is published; `enqueued_at` is written only after
a publish succeeded, so a failed publish is simply picked up by the next sweep.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import structlog
from redis.exceptions import LockError
from redis.lock import Lock
from sqlalchemy import and_, bindparam, exists, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import Attempt, DeliveryStatus, Job, JobEvent, JobStatus, WebhookDelivery
from worker.broker.publish import Publisher
from worker.broker.queue import broker_job_ids, broker_message_count, stale_deliveries
from worker.errors import WorkerLostError
from worker.settings import Settings
from worker.store import job_sql, retention, terminal
from worker.store.retention import Removed
from worker.webhooks import dispatch, outbox

log = structlog.get_logger(__name__)

KEY_PREFIX = "macao-ocr:sweeper:"
LOCK_KEY = KEY_PREFIX + "leader"
# Written once into the broker's Redis; it vanishes with everything else when that Redis
# restarts without persistence, which is how we learn that queued messages may be gone.
EPOCH_KEY = KEY_PREFIX + "broker-epoch"
# Held for republish_after_s: a count mismatch triggers at most one broker scan per period.
SCAN_GUARD_KEY = KEY_PREFIX + "scan-guard"

# The producer commits, then publishes, then records enqueued_at: a few seconds of grace
# before a job without enqueued_at counts as never published.
NEVER_PUBLISHED_GRACE_S = 5.0
# Bounds one sweep's work; the rest waits for the next sweep.
SWEEP_LIMIT = 5_000
PUBLISH_CHUNK = 500
# Retention batches (of worker.store.retention.BATCH jobs) per kind per sweep.
RETENTION_BATCHES = 1
WORKER_LOST = job_sql.WORKER_LOST

WAITING = (JobStatus.queued, JobStatus.retrying)


@dataclass
class SweepReport:
    """What one sweep did (job ids per rule)."""

    at: datetime
    due_retries: list[uuid.UUID] = field(default_factory=list)
    never_published: list[uuid.UUID] = field(default_factory=list)
    lost: list[uuid.UUID] = field(default_factory=list)
    recovered: list[uuid.UUID] = field(default_factory=list)
    # Recovered jobs whose budget was spent: failed with WorkerLost instead of retried.
    failed: list[uuid.UUID] = field(default_factory=list)
    broker_restarted: bool = False
    broker_scanned: bool = False
    published: int = 0
    # Webhook deliveries published (rule 5).
    deliveries: list[uuid.UUID] = field(default_factory=list)
    publish_failed: bool = False
    # What retention deleted (rule 6): counts per kind.
    retention: Removed = field(default_factory=Removed)

    @property
    def changed(self) -> bool:
        return bool(
            self.due_retries or self.never_published or self.lost or self.recovered or self.failed
        )


def _utc(value: datetime | None) -> datetime:
    now = value or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be an aware UTC datetime")
    return now.astimezone(UTC)


def sweep_once(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    *,
    redis: redis.Redis | None = None,
    now: datetime | None = None,
    webhook_publisher: Publisher | None = None,
) -> SweepReport:
    """Run every sweep rule once. `redis` is the broker's Redis; without it rule 3 is skipped.
    Without `webhook_publisher` rule 5 is."""
    report = SweepReport(at=_utc(now))
    due = probe(session_factory, settings, report.at, count_expected=redis is not None)
    if due.dead_workers:
        _recover_dead_workers(session_factory, settings, report)
    if due.retries or report.recovered:
        _publish_due_retries(session_factory, publisher, report)
    if due.never_published:
        _publish_never_published(session_factory, publisher, report)
    if redis is not None:
        # The probe's count predates the rules above: read it again if they moved a job.
        expected = None if report.changed or report.published else due.expected
        _republish_lost(session_factory, publisher, settings, redis, report, expected=expected)
    if webhook_publisher is not None and due.deliveries:
        _publish_due_deliveries(session_factory, webhook_publisher, settings, report)
    # Last: the rules that keep jobs moving come first, whatever retention meets.
    if due.retention:
        report.retention = retention.purge(
            session_factory, settings, now=report.at, max_batches=RETENTION_BATCHES
        ).removed
    if report.retention.total:
        log.info("retention", **report.retention.to_dict())
    if report.changed:
        log.info(
            "sweep",
            due_retries=len(report.due_retries),
            never_published=len(report.never_published),
            lost=len(report.lost),
            recovered=len(report.recovered),
            failed=len(report.failed),
            broker_restarted=report.broker_restarted,
        )
    return report


# -- one statement saying which rules have work ------------------------------------------


@dataclass(frozen=True)
class Due:
    """Which rules may have work at one instant (True may be a false alarm, never the
    reverse for rows committed before the probe), and rule 3's count of jobs that should
    have a message."""

    dead_workers: bool
    retries: bool
    never_published: bool
    deliveries: bool
    retention: bool
    expected: int | None


def probe(
    session_factory: sessionmaker[Session],
    settings: Settings,
    now: datetime,
    *,
    count_expected: bool = True,
) -> Due:
    """One round trip instead of a session per rule: a quiet fleet's leader sweeps every
    sweep_interval_s, and each rule's own query (ORM, pool checkout, a transaction) made
    the leader's sweeps most of an idle fleet's CPU. Each rule still runs its own exact
    query when its flag is set; a row committed after the probe waits for the next sweep."""
    cut = retention.Cutoffs.at(now, settings)
    params = {
        "now": now,
        "never_published_before": now - timedelta(seconds=NEVER_PUBLISHED_GRACE_S),
        "succeeded_images": cut.succeeded_images,
        "failed_images": cut.failed_images,
        "results": cut.results,
    }
    with session_factory() as session:
        row = session.connection().execute(_probe_statement(count_expected), params).one()
    return Due(
        dead_workers=bool(row[0]),
        retries=bool(row[1]),
        never_published=bool(row[2]),
        deliveries=bool(row[3]),
        retention=bool(row[4]),
        expected=int(row[5] or 0) if count_expected else None,
    )


_probe_statements: dict[bool, Any] = {}


def _probe_statement(count_expected: bool) -> Any:
    # Built once, with its instants as parameters: building it took more CPU than running it.
    statement = _probe_statements.get(count_expected)
    if statement is None:
        now = bindparam("now", type_=Job.lease_expires_at.type)

        def instant(name: str) -> Any:
            return bindparam(name, type_=now.type)

        # retention's own conditions, with parameters where its cutoffs go.
        cut = retention.Cutoffs(
            succeeded_images=instant("succeeded_images"),
            failed_images=instant("failed_images"),
            results=instant("results"),
        )
        d = WebhookDelivery
        columns: list[Any] = [
            exists().where(Job.status == JobStatus.running, Job.lease_expires_at < now),
            exists().where(_due_retry(now)),
            exists().where(_never_published(instant("never_published_before"))),
            # A superset of dispatch.due_deliveries' condition, which decides.
            exists().where(d.status == DeliveryStatus.pending, d.next_attempt_at <= now),
            or_(*(exists().where(where) for where in _retention_due(cut))),
        ]
        if count_expected:
            columns.append(_expected_count().scalar_subquery())
        statement = _probe_statements.setdefault(count_expected, select(*columns))
    return statement


def _retention_due(cut: retention.Cutoffs) -> list[Any]:
    """The conditions of every pass of retention.purge (its own, so they cannot drift)."""
    return [
        retention._images_due(cut, JobStatus.succeeded),
        retention._images_due(cut, JobStatus.failed),
        retention._results_due(cut),
        retention._erased_results_held(),
    ]


# -- rule 4: dead workers ---------------------------------------------------------------


def _finished(session: Session, job_id: uuid.UUID, now: datetime) -> None:
    """A job the sweeper failed: its batch counter and webhook outbox rows, in its
    transaction (the outbox rows read the failed row: it is flushed first)."""
    session.flush()
    terminal.on_job_terminal(session.connection(), job_id, JobStatus.failed, now=now)
    outbox.record_job_finished(session.connection(), job_id, now)


def _recover_dead_workers(
    session_factory: sessionmaker[Session], settings: Settings, report: SweepReport
) -> None:
    now = report.at
    with session_factory() as session, session.begin():
        jobs = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
            .order_by(Job.lease_expires_at)
            .limit(SWEEP_LIMIT)
            .with_for_update(skip_locked=True)
        ).all()
        for job in jobs:
            open_attempts = session.scalars(
                select(Attempt)
                .where(Attempt.job_id == job.id, Attempt.finished_at.is_(None))
                .order_by(Attempt.number)
            ).all()
            for attempt in open_attempts:
                attempt.finished_at = now
                attempt.outcome_code = WORKER_LOST
                attempt.message = "worker lost during the call (lease expired)"
            host = job.worker_host or "unknown host"
            message = f"worker {host} lost the job (lease expired)"
            session.add(
                JobEvent(
                    job_id=job.id,
                    at=now,
                    kind="recovered",
                    actor="sweeper",
                    reason=message,
                    previous_status=JobStatus.running.value,
                    previous_error_code=job.last_error_code,
                )
            )
            # Counted whether or not the call went out: a job that kills its worker before
            # calling (say, while decoding its image) must not loop forever either.
            job.attempts += 1
            job.last_error_code = WORKER_LOST
            job.last_error_message = message
            job.lease_expires_at = None
            session.flush()
            lost = job_sql.count_lost(session.connection(), job.id, since=job.started_at)
            if lost >= settings.max_worker_lost:
                # Its worker keeps dying under it: not the API's fault, and another round
                # would cost another call (and perhaps another worker).
                error = WorkerLostError(lost)
                job.status = JobStatus.failed
                job.finished_at = now
                job.next_attempt_at = None
                job.last_error_code = error.code
                job.last_error_message = error.message
                report.failed.append(job.id)
                _finished(session, job.id, now)
            elif job.attempts >= settings.max_attempts:
                job.status = JobStatus.failed
                job.finished_at = now
                job.next_attempt_at = None
                report.failed.append(job.id)
                _finished(session, job.id, now)
            else:
                job.status = JobStatus.retrying
                job.next_attempt_at = now
                # Unpublished: rule 1 publishes it after this commit.
                job.enqueued_at = None
                report.recovered.append(job.id)
    for job_id in report.recovered:
        log.warning("job_recovered", job_id=str(job_id), outcome_code=WORKER_LOST)
    for job_id in report.failed:
        log.warning("job_failed", job_id=str(job_id), outcome_code=WORKER_LOST)


# -- rules 1 and 2: due retries, never published ------------------------------------------


def _due_retry(now: Any) -> Any:
    return and_(
        Job.status == JobStatus.retrying,
        Job.next_attempt_at <= now,
        or_(Job.enqueued_at.is_(None), Job.enqueued_at < Job.next_attempt_at),
    )


def _never_published(before: Any) -> Any:
    return and_(Job.status == JobStatus.queued, Job.enqueued_at.is_(None), Job.created_at < before)


def _publish_due_retries(
    session_factory: sessionmaker[Session], publisher: Publisher, report: SweepReport
) -> None:
    now = report.at
    with session_factory() as session:
        ids = list(
            session.scalars(
                select(Job.id)
                .where(_due_retry(now))
                .order_by(Job.next_attempt_at)
                .limit(SWEEP_LIMIT)
            )
        )
    report.due_retries.extend(_publish(session_factory, publisher, ids, report))


def _publish_never_published(
    session_factory: sessionmaker[Session], publisher: Publisher, report: SweepReport
) -> None:
    with session_factory() as session:
        ids = list(
            session.scalars(
                select(Job.id)
                .where(_never_published(report.at - timedelta(seconds=NEVER_PUBLISHED_GRACE_S)))
                .order_by(Job.created_at)
                .limit(SWEEP_LIMIT)
            )
        )
    report.never_published.extend(_publish(session_factory, publisher, ids, report))


def _chunks(ids: Sequence[uuid.UUID], size: int) -> Iterator[Sequence[uuid.UUID]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _publish(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    ids: Sequence[uuid.UUID],
    report: SweepReport,
) -> list[uuid.UUID]:
    """Publish in chunks, recording enqueued_at after each chunk went out; stop at a failure."""
    done: list[uuid.UUID] = []
    if report.publish_failed:
        return done
    for chunk in _chunks(ids, PUBLISH_CHUNK):
        try:
            publisher.publish(chunk)
        except Exception as exc:  # the broker is down: the next sweep tries again
            report.publish_failed = True
            log.warning("sweep_publish_failed", jobs=len(chunk), error=type(exc).__name__)
            break
        with session_factory() as session, session.begin():
            session.execute(
                update(Job)
                .where(Job.id.in_(chunk), Job.status.in_(WAITING))
                .values(enqueued_at=report.at)
                .execution_options(synchronize_session=False)
            )
        done.extend(chunk)
        report.published += len(chunk)
    return done


# -- rule 5: webhook deliveries ----------------------------------------------------------


def _publish_due_deliveries(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    report: SweepReport,
) -> None:
    with session_factory() as session:
        ids = dispatch.due_deliveries(
            session, report.at, republish_after_s=settings.republish_after_s, limit=SWEEP_LIMIT
        )
    for chunk in _chunks(ids, PUBLISH_CHUNK):
        try:
            publisher.publish(chunk)
        except Exception as exc:  # the broker is down: the next sweep tries again
            log.warning(
                "sweep_webhook_publish_failed", deliveries=len(chunk), error=type(exc).__name__
            )
            return
        with session_factory() as session, session.begin():
            dispatch.mark_enqueued(session, chunk, report.at)
        report.deliveries.extend(chunk)


# -- rule 3: messages lost with the broker ----------------------------------------------


def _published_waiting() -> Any:
    """Jobs that should have exactly one message in the broker (queue or unacked)."""
    return or_(
        and_(Job.status == JobStatus.queued, Job.enqueued_at.is_not(None)),
        and_(
            Job.status == JobStatus.retrying,
            Job.enqueued_at.is_not(None),
            Job.enqueued_at >= Job.next_attempt_at,
        ),
    )


def _expected_count() -> Any:
    return (
        select(func.count())
        .select_from(Job)
        .where(or_(_published_waiting(), Job.status == JobStatus.running))
    )


def _broker_restarted(client: redis.Redis) -> bool:
    """True when the epoch key is gone: the broker's Redis lost its data since we wrote it."""
    return bool(client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True))


def _republish_lost(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    client: redis.Redis,
    report: SweepReport,
    *,
    expected: int | None = None,
) -> None:
    """Rule 3; `expected` is the count of jobs that should have a message, when the caller
    read it at `report.at` with nothing published since (else it is read here)."""
    now = report.at
    held_s = settings.republish_after_s
    restarted = _broker_restarted(client)
    report.broker_restarted = restarted
    if expected is None:
        with session_factory() as session:
            expected = session.scalar(_expected_count())
    present = broker_message_count(client)
    deficit = (expected or 0) - present
    if not restarted:
        # Fewer messages than jobs waiting for one, or a message held by a consumer for
        # longer than a job should wait once delivered (a SIGKILLed worker's).
        if deficit <= 0 and stale_deliveries(client, held_s) == 0:
            return
        if not client.set(SCAN_GUARD_KEY, "1", nx=True, ex=max(1, int(held_s))):
            return
    report.broker_scanned = True
    # After a restart every message pushed before this scan began is gone unless it is in
    # the broker now; otherwise give in-flight publishes republish_after_s to land.
    cutoff = now if restarted else now - timedelta(seconds=held_s)
    in_broker = broker_job_ids(client, held_within_s=held_s)
    with session_factory() as session:
        candidates = list(
            session.scalars(
                select(Job.id)
                .where(_published_waiting(), Job.enqueued_at < cutoff)
                .order_by(Job.enqueued_at)
                .limit(SWEEP_LIMIT)
            )
        )
    lost = [job_id for job_id in candidates if job_id not in in_broker]
    if restarted and not lost:
        # A new (or emptied) Redis that held nothing we miss: a first start looks the same.
        log.info("broker_epoch_started", expected=expected, present=present)
    if lost:
        log.warning(
            "broker_messages_lost",
            broker_restarted=restarted,
            expected=expected,
            present=present,
            republishing=len(lost),
        )
    report.lost.extend(_publish(session_factory, publisher, lost, report))
    if report.publish_failed and restarted:
        # The broker went away again mid-republish: scan afresh on the next sweep.
        client.delete(EPOCH_KEY)


# -- leader election and the background thread --------------------------------------------


class SweeperLeader:
    """A Redis lock with a TTL: whoever holds it sweeps; a dead holder's lock simply expires."""

    def __init__(self, client: redis.Redis, *, ttl_s: float, key: str = LOCK_KEY) -> None:
        self._lock = Lock(client, key, timeout=ttl_s, thread_local=False)

    def try_lead(self) -> bool:
        """Keep or take the lead without blocking; False while another process holds it."""
        # Reacquire checks the token itself (one round trip, not owned()'s extra GET): a
        # non-leader tries one SET NX per sweep, the leader one script.
        if self._lock.local.token is not None:
            try:
                self._lock.reacquire()
                return True
            except LockError:
                pass  # expired and perhaps taken by another: try a fresh acquire
        return bool(self._lock.acquire(blocking=False))

    def release(self) -> None:
        """Give up the lead (at shutdown) so another process takes over at once."""
        with contextlib.suppress(LockError, redis.RedisError):
            self._lock.release()


def leader_ttl_s(settings: Settings) -> float:
    """Long enough to survive a slow sweep, short enough that a dead leader is replaced soon."""
    return max(10.0, 5 * settings.sweep_interval_s)


def broker_client(settings: Settings) -> redis.Redis:
    """The broker's Redis with short timeouts: a sweep must never hang on it."""
    return redis.Redis.from_url(
        settings.broker_url, socket_connect_timeout=3.0, socket_timeout=10.0
    )


def sweep_if_leader(
    leader: SweeperLeader,
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    client: redis.Redis,
    *,
    now: datetime | None = None,
    webhook_publisher: Publisher | None = None,
) -> SweepReport | None:
    """One tick of the loop: sweep when this process leads, else None."""
    if not leader.try_lead():
        return None
    return sweep_once(
        session_factory,
        publisher,
        settings,
        redis=client,
        now=now,
        webhook_publisher=webhook_publisher,
    )


def run_sweeper(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    stop: threading.Event,
    *,
    client: redis.Redis | None = None,
    webhook_publisher: Publisher | None = None,
) -> None:
    """The loop: sweep every sweep_interval_s while leading; outages are logged and outlived."""
    client = client or broker_client(settings)
    leader = SweeperLeader(client, ttl_s=leader_ttl_s(settings))
    failing = False
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                sweep_if_leader(
                    leader,
                    session_factory,
                    publisher,
                    settings,
                    client,
                    webhook_publisher=webhook_publisher,
                )
                if failing:
                    log.info("sweeper_recovered")
                failing = False
            except (redis.RedisError, SQLAlchemyError, OSError) as exc:
                # Redis or PostgreSQL restarting: say so once, keep trying every interval.
                if not failing:
                    log.warning("sweeper_unavailable", error=type(exc).__name__)
                failing = True
            except Exception:
                log.exception("sweeper_error")
            elapsed_s = time.monotonic() - started
            stop.wait(max(0.0, settings.sweep_interval_s - elapsed_s))
    finally:
        leader.release()


class SweeperThread(threading.Thread):
    """The sweeper loop in a daemon thread; `stop()` ends it and gives up the lead."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        publisher: Publisher,
        webhook_publisher: Publisher | None = None,
    ) -> None:
        super().__init__(name="macao-ocr-sweeper", daemon=True)
        self.stop_event = threading.Event()
        self._args = (settings, session_factory, publisher)
        self._webhook_publisher = webhook_publisher

    def run(self) -> None:
        run_sweeper(*self._args, self.stop_event, webhook_publisher=self._webhook_publisher)

    def stop(self, timeout_s: float | None = 5.0) -> None:
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)


def start_sweeper_thread(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    webhook_publisher: Publisher | None = None,
) -> SweeperThread:
    """Start the sweeper loop in a daemon thread (one per worker process; one leader sweeps)."""
    thread = SweeperThread(settings, session_factory, publisher, webhook_publisher)
    thread.start()
    return thread
