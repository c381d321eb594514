"""The broker's Redis loses every message mid-run (FLUSHDB, as a restart without persistence
does): no job is lost and none is paid for twice.

A real worker at a real quota works a backlog too large to hold: most of it waits in the
broker as messages. The FLUSHDB takes those messages, the `unacked` hash, the limiter's and
the circuit's state and the sweeper's lock and epoch key. The sweeper must notice (the epoch
key is gone) and publish again every waiting job whose message vanished; the claim in SQL
keeps the duplicates it may publish (a job whose message a worker still holds) from being
called twice. How fast the fleet is back at its quota is `bench.quota --mode brokerloss`'s
figure, not this test's.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from emulator.specimen import make_specimen
from models import Attempt, Job, JobStatus, Result
from tests.fixtures.workers import sealer_for_tests
from worker.broker.publish import CeleryPublisher
from worker.broker.queue import queue_depth
from worker.producer import JobSpec, submit_many
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

JOBS = 160
QPS = 20
DISTINCT_IMAGES = 10
# Flush once this many are stored, while most of the backlog still waits in the broker.
FLUSH_AFTER_STORED = 15
DEADLINE_S = 90.0


def submit(env: dict[str, str], factory: sessionmaker[Session]) -> list[uuid.UUID]:
    settings = Settings(
        database_url=env["MACAO_OCR_DATABASE_URL"], broker_url=env["MACAO_OCR_BROKER_URL"]
    )
    images = [make_specimen(seed=5000 + i).image for i in range(DISTINCT_IMAGES)]
    app = Celery("broker-loss-producer", broker=settings.broker_url, set_as_current=False)
    try:
        specs = [JobSpec(front=images[i % DISTINCT_IMAGES]) for i in range(JOBS)]
        return submit_many(
            factory, CeleryPublisher(app), settings, specs, sealer=sealer_for_tests()
        )
    finally:
        app.close()


def count(factory: sessionmaker[Session], *where: Any) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)


def republished(log_text: str) -> int:
    """Jobs the sweeper said it republished after finding messages lost."""
    total = 0
    for line in log_text.splitlines():
        if '"broker_messages_lost"' in line and line.startswith("{"):
            total += int(json.loads(line).get("republishing", 0))
    return total


def test_no_job_lost_or_paid_twice_after_the_broker_loses_every_message(
    worker_env: dict[str, str], emulator: Any, celery_workers: Any
) -> None:
    env = dict(worker_env, MACAO_OCR_QPS=str(QPS))
    emulator.configure(quota_per_s=QPS, latency_median_ms=50, latency_sigma=0.2)
    engine = sa.create_engine(env["MACAO_OCR_DATABASE_URL"])
    factory = sessionmaker(engine, expire_on_commit=False)
    broker = redis.Redis.from_url(env["MACAO_OCR_BROKER_URL"])
    try:
        # Few threads: the worker holds a handful of messages, the broker keeps the rest.
        workers = celery_workers(env, n=1, concurrency=4)
        ids = submit(env, factory)
        deadline = time.monotonic() + 30
        while count(factory, Job.status == JobStatus.succeeded) < FLUSH_AFTER_STORED:
            assert time.monotonic() < deadline, workers.tail(workers.workers[0])
            time.sleep(0.05)
        waiting_in_broker = queue_depth(broker)
        assert waiting_in_broker >= JOBS // 2, "the backlog was not in the broker"
        broker.flushdb()

        deadline = time.monotonic() + DEADLINE_S
        while count(factory, Job.status == JobStatus.succeeded) < JOBS:
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)

        with factory() as session:
            statuses = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            assert set(session.scalars(select(Job.id))) == set(ids)
            assert statuses == {JobStatus.succeeded: JOBS}, (
                f"jobs lost: {statuses}\n" + workers.tail(workers.workers[0])
            )
            assert session.scalar(select(func.count()).select_from(Result)) == JOBS
            paid = session.execute(
                select(Attempt.job_id, func.count())
                .where(Attempt.outcome_code == "OK")
                .group_by(Attempt.job_id)
            ).all()
            assert len(paid) == JOBS and {n for _, n in paid} == {1}, "a job was paid twice"
            still_open = session.scalar(
                select(func.count()).select_from(Attempt).where(Attempt.finished_at.is_(None))
            )
            assert still_open == 0
        log = workers.log_text()
        # The loss happened and the sweeper repaired it (not a worker that still held them).
        assert republished(log) >= waiting_in_broker - 5, (waiting_in_broker, republished(log))
        counters = emulator.counters()
        # The API's own count: one paid answer per job, whatever the duplicates.
        assert counters["ok"] == JOBS, counters["by_code"]
        print(
            f"broker loss: {waiting_in_broker} messages flushed, {republished(log)} republished, "
            f"throttled {counters['total'] - counters['ok']}"
        )
    finally:
        broker.close()
        engine.dispose()
