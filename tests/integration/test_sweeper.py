"""The sweeper's rules on a migrated PostgreSQL, with a fixed clock and a recording publisher;
broker-facing rules against the real test Redis with real kombu messages."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from kombu import Connection
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import Attempt, Job, JobEvent, JobStatus
from tests.fixtures.workers import sealed_job
from worker.broker.publish import QUEUE, CeleryPublisher, RecordingPublisher
from worker.broker.queue import broker_job_ids, broker_message_count, job_id_of_message
from worker.settings import Settings
from worker.sweeper import (
    EPOCH_KEY,
    WORKER_LOST,
    Due,
    SweeperLeader,
    probe,
    start_sweeper_thread,
    sweep_if_leader,
    sweep_once,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


@pytest.fixture
def settings() -> Settings:
    return Settings(max_attempts=3, republish_after_s=60.0, sweep_interval_s=0.2)


def add_job(session: Session, **fields: object) -> Job:
    values: dict[str, object] = {
        "front_url": "https://cards.example/front.jpg",
        "status": JobStatus.queued,
        "created_at": ago(600),
    }
    values.update(fields)
    job = sealed_job(**values)
    session.add(job)
    session.flush()
    return job


def reload(session_factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


# -- rule 1: due retries ------------------------------------------------------------------


def test_due_retry_is_published_once(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        due = add_job(
            session, status=JobStatus.retrying, next_attempt_at=ago(1), enqueued_at=ago(300)
        )
        never_sent = add_job(session, status=JobStatus.retrying, next_attempt_at=ago(1))
        not_due = add_job(
            session, status=JobStatus.retrying, next_attempt_at=ago(-30), enqueued_at=ago(300)
        )
        already_sent = add_job(
            session, status=JobStatus.retrying, next_attempt_at=ago(10), enqueued_at=ago(5)
        )
    publisher = RecordingPublisher()

    report = sweep_once(session_factory, publisher, settings, now=NOW)

    assert set(publisher.published) == {due.id, never_sent.id}
    assert set(report.due_retries) == {due.id, never_sent.id}
    assert reload(session_factory, due.id).enqueued_at == NOW
    assert reload(session_factory, not_due.id).enqueued_at == ago(300)
    assert reload(session_factory, already_sent.id).enqueued_at == ago(5)

    again = sweep_once(session_factory, publisher, settings, now=NOW + timedelta(seconds=1))
    assert again.due_retries == []
    assert len(publisher.published) == 2


# -- rule 2: never handed to the broker ---------------------------------------------------


def test_never_published_queued_jobs_are_published_after_grace(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        orphan = add_job(session, created_at=ago(30))
        fresh = add_job(session, created_at=ago(1))
        published = add_job(session, created_at=ago(30), enqueued_at=ago(29))
    publisher = RecordingPublisher()

    report = sweep_once(session_factory, publisher, settings, now=NOW)

    assert publisher.published == [orphan.id]
    assert report.never_published == [orphan.id]
    assert reload(session_factory, orphan.id).enqueued_at == NOW
    assert reload(session_factory, fresh.id).enqueued_at is None
    assert reload(session_factory, published.id).enqueued_at == ago(29)


def test_broker_down_leaves_jobs_for_the_next_sweep(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        orphan = add_job(session, created_at=ago(30))
        retry = add_job(session, status=JobStatus.retrying, next_attempt_at=ago(1))
    down = RecordingPublisher(fail=True)

    report = sweep_once(session_factory, down, settings, now=NOW)

    assert report.publish_failed
    assert report.published == 0
    assert reload(session_factory, orphan.id).enqueued_at is None
    assert reload(session_factory, retry.id).enqueued_at is None

    up = RecordingPublisher()
    sweep_once(session_factory, up, settings, now=NOW + timedelta(seconds=2))
    assert set(up.published) == {orphan.id, retry.id}


# -- rule 4: dead workers -----------------------------------------------------------------


def test_expired_lease_closes_open_attempt_and_requeues(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        lost = add_job(
            session,
            status=JobStatus.running,
            lease_expires_at=ago(1),
            attempts=1,
            api_calls=2,
            worker_host="macao-ocr-1@box",
            last_error_code="FailedOperation.OcrFailed",
            enqueued_at=ago(400),
        )
        session.add_all(
            [
                Attempt(
                    job_id=lost.id,
                    number=1,
                    started_at=ago(400),
                    finished_at=ago(399),
                    outcome_code="FailedOperation.OcrFailed",
                ),
                Attempt(job_id=lost.id, number=2, started_at=ago(200)),
            ]
        )
        alive = add_job(session, status=JobStatus.running, lease_expires_at=ago(-60))
        session.add(Attempt(job_id=alive.id, number=1, started_at=ago(10)))
    publisher = RecordingPublisher()

    report = sweep_once(session_factory, publisher, settings, now=NOW)

    assert report.recovered == [lost.id]
    assert report.due_retries == [lost.id]
    assert publisher.published == [lost.id]
    job = reload(session_factory, lost.id)
    assert job.status == JobStatus.retrying
    assert job.attempts == 2
    assert job.next_attempt_at == NOW
    assert job.enqueued_at == NOW
    assert job.lease_expires_at is None
    assert job.last_error_code == WORKER_LOST
    with session_factory() as session:
        attempts = session.scalars(
            select(Attempt).where(Attempt.job_id == lost.id).order_by(Attempt.number)
        ).all()
        assert [a.outcome_code for a in attempts] == ["FailedOperation.OcrFailed", WORKER_LOST]
        assert attempts[1].finished_at == NOW
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == lost.id)).all()
        assert [(e.kind, e.previous_status, e.previous_error_code) for e in events] == [
            ("recovered", "running", "FailedOperation.OcrFailed")
        ]
        still_open = session.scalars(
            select(Attempt).where(Attempt.job_id == alive.id, Attempt.finished_at.is_(None))
        ).all()
        assert len(still_open) == 1
    assert reload(session_factory, alive.id).status == JobStatus.running


def test_job_that_keeps_killing_workers_fails_when_budget_is_spent(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        poison = add_job(
            session, status=JobStatus.running, lease_expires_at=ago(1), attempts=2, api_calls=2
        )
    publisher = RecordingPublisher()

    report = sweep_once(session_factory, publisher, settings, now=NOW)

    assert report.failed == [poison.id]
    assert publisher.published == []
    job = reload(session_factory, poison.id)
    assert job.status == JobStatus.failed
    assert job.attempts == settings.max_attempts
    assert job.finished_at == NOW
    assert job.last_error_code == WORKER_LOST


def test_recovery_is_committed_before_it_is_published(
    fresh_migrated_database: Callable[[], str], settings: Settings
) -> None:
    url = fresh_migrated_database()
    engine = sa.create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    observer = sa.create_engine(url)
    try:
        with factory() as session, session.begin():
            job = add_job(session, status=JobStatus.running, lease_expires_at=ago(1))
        seen: list[tuple[str, object]] = []

        def check(ids: Sequence[uuid.UUID]) -> None:
            # Another connection: only committed data is visible to it.
            with observer.connect() as conn:
                row = conn.execute(
                    sa.text("select status, next_attempt_at from job where id = :id"),
                    {"id": ids[0]},
                ).one()
            seen.append((row[0], row[1]))

        sweep_once(factory, RecordingPublisher(on_publish=check), settings, now=NOW)
        assert seen == [("retrying", NOW)]
        assert reload(factory, job.id).enqueued_at == NOW
    finally:
        engine.dispose()
        observer.dispose()


# -- rule 3: messages lost with the broker ------------------------------------------------


@pytest.fixture
def broker(clean_redis: str) -> Iterator[tuple[redis.Redis, CeleryPublisher]]:
    app = Celery("sweeper-test", broker=clean_redis)
    client = redis.Redis.from_url(clean_redis)
    yield client, CeleryPublisher(app)
    client.close()
    app.close()


def waiting_jobs(session_factory: sessionmaker[Session], n: int, age_s: float) -> list[Job]:
    with session_factory() as session, session.begin():
        return [add_job(session, enqueued_at=ago(age_s)) for _ in range(n)]


def test_message_parser_reads_celery_messages(
    broker: tuple[redis.Redis, CeleryPublisher],
) -> None:
    client, publisher = broker
    ids = [uuid.uuid4() for _ in range(3)]
    publisher.publish(ids)
    client.lpush(QUEUE, b"not a kombu message")

    assert broker_message_count(client) == 4
    assert broker_job_ids(client) == set(ids)
    assert job_id_of_message(b'{"body": "bm90IGpzb24="}') is None

    # A delivered, unacknowledged message moves to kombu's `unacked` hash: still present.
    with Connection(broker_url(client)) as conn:
        channel: Any = conn.default_channel
        message = channel.basic_get(QUEUE, no_ack=False)
        assert message is not None
        assert client.hlen("unacked") == 1
        assert broker_message_count(client) == 4
        assert broker_job_ids(client) == set(ids)


def broker_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def test_broker_restart_republishes_only_the_missing(
    session_factory: sessionmaker[Session],
    settings: Settings,
    broker: tuple[redis.Redis, CeleryPublisher],
) -> None:
    client, publisher = broker
    jobs = waiting_jobs(session_factory, 4, age_s=30)
    publisher.publish([j.id for j in jobs])
    recorder = RecordingPublisher()

    first = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)
    # The epoch key did not exist yet, so the broker is scanned: every message is there.
    assert first.broker_restarted
    assert first.lost == []
    assert client.exists(EPOCH_KEY)

    quiet = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)
    assert not quiet.broker_restarted
    assert not quiet.broker_scanned

    # Redis restarts without persistence: everything is gone, epoch key included.
    client.flushdb()
    publisher.publish([jobs[0].id])  # published again after the restart: not lost
    report = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)

    assert report.broker_restarted
    assert set(report.lost) == {j.id for j in jobs[1:]}
    assert set(recorder.published) == {j.id for j in jobs[1:]}
    assert reload(session_factory, jobs[1].id).enqueued_at == NOW


def test_first_start_on_a_new_redis_warns_of_no_loss(
    session_factory: sessionmaker[Session],
    settings: Settings,
    broker: tuple[redis.Redis, CeleryPublisher],
) -> None:
    client, publisher = broker
    jobs = waiting_jobs(session_factory, 2, age_s=30)
    publisher.publish([j.id for j in jobs])
    recorder = RecordingPublisher()

    with capture_logs() as logs:
        first = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)
    # A first start cannot tell a new Redis from a restarted one; nothing is missing, so
    # nothing is reported lost.
    assert first.broker_restarted
    assert first.lost == []
    assert [e for e in logs if e["event"] == "broker_messages_lost"] == []

    client.flushdb()  # a real loss still warns
    with capture_logs() as logs:
        report = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)
    assert set(report.lost) == {j.id for j in jobs}
    lost = [e for e in logs if e["event"] == "broker_messages_lost"]
    assert len(lost) == 1
    assert lost[0]["log_level"] == "warning"


def test_missing_message_found_by_count_is_republished(
    session_factory: sessionmaker[Session],
    settings: Settings,
    broker: tuple[redis.Redis, CeleryPublisher],
) -> None:
    client, publisher = broker
    old = waiting_jobs(session_factory, 3, age_s=120)
    recent = waiting_jobs(session_factory, 1, age_s=5)
    publisher.publish([j.id for j in old + recent])
    client.set(EPOCH_KEY, "running")
    recorder = RecordingPublisher()

    assert sweep_once(session_factory, recorder, settings, redis=client, now=NOW).lost == []

    # One message vanishes (the oldest sits at the right end: kombu pops from there).
    client.rpop(QUEUE)
    client.lpop(QUEUE)  # and the newest one too: it is too recent to be judged lost
    report = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)

    assert report.broker_scanned
    assert not report.broker_restarted
    assert report.lost == [old[0].id]
    assert recorder.published == [old[0].id]

    # The scan guard keeps a persisting mismatch from rescanning every sweep.
    client.lpop(QUEUE)
    guarded = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)
    assert not guarded.broker_scanned
    assert guarded.lost == []


def test_message_held_by_a_dead_consumer_is_republished(
    session_factory: sessionmaker[Session],
    settings: Settings,
    broker: tuple[redis.Redis, CeleryPublisher],
) -> None:
    client, publisher = broker
    held, waiting = waiting_jobs(session_factory, 2, age_s=300)
    publisher.publish([held.id])
    publisher.publish([waiting.id])
    client.set(EPOCH_KEY, "running")
    recorder = RecordingPublisher()
    with Connection(broker_url(client)) as conn:
        # A consumer takes `held` (oldest, at the right end) and is SIGKILLed: kombu keeps the
        # message in `unacked` until the visibility timeout, an hour away. (The connection
        # stays open: closing it would hand the message back, as a warm shutdown does.)
        taker: Any = conn.default_channel
        assert taker.basic_get(QUEUE, no_ack=False) is not None
        (tag,) = client.zrange("unacked_index", 0, -1)

        fresh = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)
        assert not fresh.broker_scanned  # counts match and the delivery is recent

        seconds, _ = client.time()
        client.zadd(
            "unacked_index",
            {
                tag.decode() if isinstance(tag, bytes) else str(tag): seconds
                - settings.republish_after_s
                - 5
            },
        )
        report = sweep_once(session_factory, recorder, settings, redis=client, now=NOW)

        assert report.broker_scanned
        assert report.lost == [held.id]
        assert recorder.published == [held.id]


# -- leader election and the thread -------------------------------------------------------


def test_only_one_of_two_sweepers_sweeps(
    session_factory: sessionmaker[Session], settings: Settings, clean_redis: str
) -> None:
    client = redis.Redis.from_url(clean_redis)
    a = SweeperLeader(client, ttl_s=0.6)
    b = SweeperLeader(client, ttl_s=0.6)
    with session_factory() as session, session.begin():
        job = add_job(session, status=JobStatus.retrying, next_attempt_at=ago(1))
    publisher = RecordingPublisher()

    reports = [
        sweep_if_leader(leader, session_factory, publisher, settings, client, now=NOW)
        for leader in (a, b, a, b)
    ]

    assert [r is not None for r in reports] == [True, False, True, False]
    assert publisher.published == [job.id]

    # The leader dies (stops renewing): after the TTL the other takes over.
    time.sleep(0.8)
    assert b.try_lead()
    assert not a.try_lead()
    b.release()
    assert a.try_lead()
    a.release()
    client.close()


def test_sweeper_thread_publishes_and_stops(
    fresh_migrated_database: Callable[[], str], clean_redis: str
) -> None:
    url = fresh_migrated_database()
    settings = Settings(database_url=url, broker_url=clean_redis, sweep_interval_s=0.1)
    engine = sa.create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    now = datetime.now(UTC)
    with factory() as session, session.begin():
        job = add_job(
            session, status=JobStatus.retrying, next_attempt_at=now - timedelta(seconds=1)
        )
    publisher = RecordingPublisher()

    thread = start_sweeper_thread(settings, factory, publisher)
    try:
        deadline = time.monotonic() + 10
        while not publisher.published and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        thread.stop()  # type: ignore[attr-defined]
    assert not thread.is_alive()
    assert publisher.published == [job.id]
    # It gave up the lead at shutdown: another process can lead at once.
    assert SweeperLeader(redis.Redis.from_url(clean_redis), ttl_s=5).try_lead()
    engine.dispose()


def test_sweep_once_cli_publishes_to_the_broker(
    fresh_migrated_database: Callable[[], str],
    clean_redis: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from worker.cli import app as cli_app

    url = fresh_migrated_database()
    monkeypatch.setenv("MACAO_OCR_DATABASE_URL", url)
    monkeypatch.setenv("MACAO_OCR_BROKER_URL", clean_redis)
    engine = sa.create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    now = datetime.now(UTC)
    with factory() as session, session.begin():
        job = add_job(
            session, status=JobStatus.retrying, next_attempt_at=now - timedelta(seconds=1)
        )

    result = CliRunner().invoke(cli_app, ["sweep", "--once", "--json"])

    assert result.exit_code == 0, result.output
    assert '"due_retries": 1' in result.output
    client = redis.Redis.from_url(clean_redis)
    assert broker_job_ids(client) == {job.id}
    assert reload(factory, job.id).enqueued_at is not None
    engine.dispose()


def test_sweeper_thread_outlives_a_broker_outage(
    session_factory: sessionmaker[Session],
) -> None:
    from demo.embedded_broker import free_port

    # Nothing listens there: every tick fails to reach Redis, and the loop keeps going.
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", sweep_interval_s=0.05)
    thread = start_sweeper_thread(settings, session_factory, RecordingPublisher())
    try:
        time.sleep(0.5)
        assert thread.is_alive()
    finally:
        thread.stop()  # type: ignore[attr-defined]
    assert not thread.is_alive()


# -- the probe: one statement when nothing is due ------------------------------------------


def _selects_during(session_factory: sessionmaker[Session], fn: Callable[[], Any]) -> list[str]:
    bind = session_factory.kw["bind"]
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    sa.event.listen(bind, "before_cursor_execute", record)
    try:
        fn()
    finally:
        sa.event.remove(bind, "before_cursor_execute", record)
    return seen


def test_a_quiet_sweep_is_one_statement(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        # Nothing due: a job waiting for its message, one not due yet, one done long ago.
        add_job(session, created_at=ago(30), enqueued_at=ago(29))
        add_job(session, status=JobStatus.retrying, next_attempt_at=ago(-30), enqueued_at=ago(5))
        add_job(session, status=JobStatus.running, lease_expires_at=ago(-60))
    publisher = RecordingPublisher()

    def sweep() -> None:
        sweep_once(session_factory, publisher, settings, now=NOW, webhook_publisher=publisher)

    assert len(_selects_during(session_factory, sweep)) == 1
    assert publisher.published == []


def test_the_probe_sees_each_rule_due(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    assert probe(session_factory, settings, NOW) == Due(
        dead_workers=False,
        retries=False,
        never_published=False,
        deliveries=False,
        retention=False,
        expected=0,
    )
    with session_factory() as session, session.begin():
        add_job(session, status=JobStatus.running, lease_expires_at=ago(1))
        add_job(session, status=JobStatus.retrying, next_attempt_at=ago(1), enqueued_at=ago(9))
        add_job(session, created_at=ago(30))
        add_job(session, created_at=ago(30), enqueued_at=ago(29))
        add_job(session, status=JobStatus.succeeded, finished_at=ago(1))
    assert probe(session_factory, settings, NOW) == Due(
        dead_workers=True,
        retries=True,
        never_published=True,
        deliveries=False,
        retention=True,
        # The running job and the one queued with its message.
        expected=2,
    )
    # Half a minute earlier none of them was due yet.
    before = probe(session_factory, settings, ago(31))
    assert not (before.dead_workers or before.retries or before.never_published or before.retention)
