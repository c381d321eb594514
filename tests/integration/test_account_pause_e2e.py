"""An account-level error pauses every call on every worker, and no job fails for it.

Real worker processes, Redis, PostgreSQL and the emulator answering
ResourceUnavailable.InArrears to every call: jobs stay queued/retrying with no budget spent,
`macao-ocr status --json` shows the pause, and the emulator sees probes (one per probe
interval), not a storm. Once the fault is gone a probe succeeds, the circuit closes and every
job succeeds, each paid once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from emulator.specimen import make_specimen
from models import Job, JobStatus
from tests.fixtures.workers import cli_env, submit_jobs
from worker.producer import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

IN_ARREARS = "ResourceUnavailable.InArrears"
JOBS = 12
PROBE_INTERVAL_S = 2.0
OBSERVE_S = 10.0


@pytest.fixture
def deployment(
    worker_env: dict[str, str],
) -> Iterator[tuple[dict[str, str], sessionmaker[Session]]]:
    env = dict(worker_env, MACAO_OCR_CIRCUIT_PROBE_INTERVAL_S=str(PROBE_INTERVAL_S))
    engine = sa.create_engine(env["MACAO_OCR_DATABASE_URL"])
    yield env, sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def jobs_of(factory: sessionmaker[Session], ids: list[uuid.UUID]) -> list[Job]:
    with factory() as session:
        jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
        for job in jobs:
            session.expunge(job)
    return jobs


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def status_json(env: dict[str, str], ids: list[uuid.UUID]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "macao-ocr"), "status", "--json", *map(str, ids)],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_account_error_pauses_without_failing_and_resumes(
    deployment: tuple[dict[str, str], sessionmaker[Session]],
    emulator: Any,
    celery_workers: Any,
) -> None:
    env, factory = deployment
    emulator.configure(force_error_code=IN_ARREARS)
    workers = celery_workers(env, n=2, concurrency=10)
    specs = [JobSpec(front=make_specimen(seed=2000 + i).image) for i in range(JOBS)]
    ids = submit_jobs(env, factory, specs)
    submitted = time.monotonic()

    # Wait until the pause is visible to operators.
    def paused() -> bool:
        return all(v.get("paused") for v in status_json(env, ids[:1]))

    wait_for(paused, 30, "the account pause to show in `status --json`")
    view = status_json(env, ids[:1])[0]
    assert view["paused"]["code"] == IN_ARREARS
    calls_before = emulator.counters()["total"]
    # Before the pause opened each job could call at most once (the answer opens it);
    # after, only probes.
    probes_max = (time.monotonic() - submitted) / PROBE_INTERVAL_S + 2
    assert 1 <= calls_before <= JOBS + probes_max, calls_before

    time.sleep(OBSERVE_S)

    calls_during = emulator.counters()["total"] - calls_before
    # Probes: one per interval across the fleet (plus one for timing at the edges).
    assert calls_during <= OBSERVE_S / PROBE_INTERVAL_S + 2, calls_during
    assert calls_during >= 1  # and it does keep probing
    jobs = jobs_of(factory, ids)
    assert len(jobs) == JOBS
    assert {j.status for j in jobs} <= {JobStatus.queued, JobStatus.retrying, JobStatus.running}
    assert all(j.attempts == 0 for j in jobs), "an account pause must not spend job budget"
    assert not any(j.status == JobStatus.failed for j in jobs)
    assert "account_paused" in workers.log_text()

    emulator.configure(force_error_code=None)
    wait_for(
        lambda: all(j.status == JobStatus.succeeded for j in jobs_of(factory, ids)),
        60,
        "every job to succeed after the account resumed",
    )
    counters = emulator.counters()
    assert counters["ok"] == JOBS  # every job paid exactly once
    assert set(counters["by_code"]) == {"OK", IN_ARREARS}
    assert all(v.get("paused") is None for v in status_json(env, ids))
    assert "account_resumed" in workers.log_text()
