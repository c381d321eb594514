"""Chaos, bounded to a few minutes: the database stays the source of truth through it all.

Real PostgreSQL; a PRIVATE `redis-server` (no persistence) as broker and limiter/circuit
state, so restarting it harms no one else; the emulator injecting a few % of OcrFailed,
DownLoadError, InternalError and connection resets; 3 worker processes, one SIGKILLed every
few seconds and started again; the Redis restarted once (every queued message vanishes).

At the end: every job terminal, none lost; every job met only transient faults, so every job
succeeded; each with exactly one result and one paid (OK) call; no attempt left open; and the
API calls per succeeded job stay within 1 + the injected fault rate + 1%.
PostgreSQL restarts are left to bench/chaos.py (it needs the right to restart the cluster).
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from demo.embedded_broker import free_port, wait_for_ping
from emulator.specimen import make_specimen
from models import Attempt, Job, JobStatus, Result
from tests.fixtures.workers import submit_jobs
from worker.producer import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOBS = 600
DISTINCT_IMAGES = 40
FAULTS = {"ocr_failed": 0.02, "download_error": 0.02, "internal_error": 0.02, "reset": 0.02}
TRANSIENT_CODES = {
    "FailedOperation.OcrFailed",
    "FailedOperation.DownLoadError",
    "InternalError",
    "Transport.Reset",
}
KILL_EVERY_S = 5.0
CHAOS_FOR_S = 26.0
REDIS_RESTART_AT_S = 10.0
DEADLINE_S = 150.0


@dataclass
class PrivateRedis:
    """A redis-server of our own on a free port, keeping nothing on disk (like production)."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        # Nothing on disk: a restart loses every queued message, as production's would.
        command += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_ping(self.url)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        time.sleep(1.0)  # a real outage, however short
        self.start()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: the chaos test needs a Redis it may restart")
    server = PrivateRedis(port=free_port())
    server.start()
    yield server
    server.kill()


def submit(env: dict[str, str], factory: sessionmaker[Session]) -> list[uuid.UUID]:
    images = [make_specimen(seed=3000 + i).image for i in range(DISTINCT_IMAGES)]
    specs = [JobSpec(front=images[i % DISTINCT_IMAGES]) for i in range(JOBS)]
    return submit_jobs(env, factory, specs)


def status_counts(factory: sessionmaker[Session]) -> dict[str, int]:
    with factory() as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {str(status.value): int(n) for status, n in rows}


def test_chaos(
    worker_env: dict[str, str],
    private_redis: PrivateRedis,
    emulator: Any,
    celery_workers: Any,
) -> None:
    env = dict(
        worker_env,
        MACAO_OCR_BROKER_URL=private_redis.url,
        MACAO_OCR_QPS="30",
        MACAO_OCR_LEASE_S="4",
        MACAO_OCR_REPUBLISH_AFTER_S="5",
        MACAO_OCR_MAX_ATTEMPTS="10",
    )
    emulator.configure(latency_median_ms=25, latency_sigma=0.5, **FAULTS)
    engine = sa.create_engine(env["MACAO_OCR_DATABASE_URL"])
    factory = sessionmaker(engine, expire_on_commit=False)
    workers = celery_workers(env, n=3, concurrency=20)
    ids = submit(env, factory)
    rng = random.Random(7)

    started = time.monotonic()
    next_kill = started + KILL_EVERY_S
    redis_restarted = False
    kills = 0
    while time.monotonic() - started < DEADLINE_S:
        elapsed = time.monotonic() - started
        counts = status_counts(factory)
        if counts.get("succeeded", 0) + counts.get("failed", 0) == JOBS:
            break
        if elapsed < CHAOS_FOR_S:
            if time.monotonic() >= next_kill:
                victim = rng.randint(1, 3)
                workers.kill(victim)
                workers.restart(victim, wait=False)
                kills += 1
                next_kill += KILL_EVERY_S
            if not redis_restarted and elapsed >= REDIS_RESTART_AT_S:
                private_redis.restart()
                redis_restarted = True
        time.sleep(0.25)
    duration_s = time.monotonic() - started

    counts = status_counts(factory)
    assert redis_restarted and kills >= 3, "the chaos did not happen"
    with factory() as session:
        failed = session.execute(
            select(Job.last_error_code, func.count())
            .where(Job.status == JobStatus.failed)
            .group_by(Job.last_error_code)
        ).all()
        assert set(session.scalars(select(Job.id))) == set(ids), f"jobs lost: {counts}"
        assert counts.get("succeeded", 0) == JOBS, (
            f"after {duration_s:.0f}s: {counts}, failed by code {failed}\n"
            + workers.tail(workers.workers[0])
        )
        results = session.scalar(select(func.count()).select_from(Result))
        assert results == JOBS
        ok_attempts = session.execute(
            select(Attempt.job_id, func.count())
            .where(Attempt.outcome_code == "OK")
            .group_by(Attempt.job_id)
        ).all()
        assert len(ok_attempts) == JOBS and {n for _, n in ok_attempts} == {1}
        still_open = session.scalar(
            select(func.count()).select_from(Attempt).where(Attempt.finished_at.is_(None))
        )
        assert still_open == 0
        codes = set(session.scalars(select(Attempt.outcome_code).distinct()))
        # A reset reads as Transport.* on our side (a timeout or a dropped connection).
        unexpected = {c for c in codes if not (c or "").startswith("Transport.")}
        assert unexpected <= {"OK", "WorkerLost", *TRANSIENT_CODES}, codes

    counters = emulator.counters()
    succeeded = counts["succeeded"]
    injected = sum(n for code, n in counters["by_code"].items() if code in TRANSIENT_CODES)
    assert counters["total"] == counters["ok"] + injected, counters["by_code"]
    calls_per_job = counters["total"] / succeeded
    fault_rate = injected / succeeded
    # What the faults cost is expected; anything beyond (calls paid twice because a worker
    # died holding the answer) must stay under 1%.
    assert calls_per_job <= 1 + fault_rate + 0.01, (calls_per_job, fault_rate, counters["ok"])
    assert redis.Redis.from_url(private_redis.url).ping()
    engine.dispose()
    print(
        f"chaos: {JOBS} jobs in {duration_s:.0f}s, {kills} kills, 1 Redis restart, "
        f"{calls_per_job:.3f} calls/job, injected fault rate {fault_rate:.3f}, "
        f"paid {counters['ok']} for {succeeded}"
    )
