"""Dead letters replayed end to end: real worker process, real Redis and PostgreSQL, the
emulator failing every call; the fault is removed, `macao-ocr replay` (a subprocess) sends
the failed jobs round again, and they succeed with their history intact."""

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
from models import Attempt, Job, JobEvent, JobStatus, Result
from tests.fixtures.workers import cli_env, submit_jobs
from worker.producer import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

OCR_FAILED = "FailedOperation.OcrFailed"
JOBS = 6
MAX_ATTEMPTS = 2


@pytest.fixture
def deployment(
    worker_env: dict[str, str],
) -> Iterator[tuple[dict[str, str], sessionmaker[Session]]]:
    env = dict(worker_env, MACAO_OCR_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    engine = sa.create_engine(env["MACAO_OCR_DATABASE_URL"])
    yield env, sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def wait_until(
    factory: sessionmaker[Session],
    ids: list[uuid.UUID],
    done: Callable[[list[Job]], bool],
    timeout_s: float,
    what: str,
) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while True:
        with factory() as session:
            jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
            for job in jobs:
                session.expunge(job)
        if done(jobs):
            return jobs
        if time.monotonic() > deadline:
            states = sorted((j.status.value, j.last_error_code or "-") for j in jobs)
            pytest.fail(f"timed out waiting for {what}: {states}")
        time.sleep(0.3)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "macao-ocr"), *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_failed_jobs_replayed_after_the_fault_is_gone(
    deployment: tuple[dict[str, str], sessionmaker[Session]],
    emulator: Any,
    celery_workers: Any,
) -> None:
    env, factory = deployment
    emulator.configure(force_error_code=OCR_FAILED)
    celery_workers(env, n=1, concurrency=10)
    specs = [JobSpec(front=make_specimen(seed=1000 + i).image) for i in range(JOBS)]
    ids = submit_jobs(env, factory, specs)

    failed = wait_until(
        factory,
        ids,
        lambda jobs: all(j.status == JobStatus.failed for j in jobs),
        90,
        "every job to fail",
    )
    assert {j.last_error_code for j in failed} == {OCR_FAILED}
    assert emulator.counters()["by_code"] == {OCR_FAILED: JOBS * MAX_ATTEMPTS}

    # Nothing to buy twice and nothing in flight: a dry run lists all of them, changes nothing.
    dry = run_cli(env, "replay", "--error-code", OCR_FAILED, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert sorted(json.loads(dry.stdout)["replayed"]) == sorted(map(str, ids))
    time.sleep(1.0)
    assert emulator.counters()["total"] == JOBS * MAX_ATTEMPTS

    emulator.configure(force_error_code=None)
    replayed = run_cli(
        env,
        "replay",
        "--error-code",
        OCR_FAILED,
        "--reason",
        "OCR backend fixed",
        "--actor",
        "e2e@test",
    )
    assert replayed.returncode == 0, replayed.stderr
    assert f"{JOBS} matched, replayed {JOBS}" in replayed.stdout

    wait_until(
        factory,
        ids,
        lambda jobs: all(j.status == JobStatus.succeeded for j in jobs),
        90,
        "every replayed job to succeed",
    )
    counters = emulator.counters()
    assert counters["ok"] == JOBS  # one paid call per job, none twice
    assert counters["total"] == JOBS * (MAX_ATTEMPTS + 1)
    with factory() as session:
        for job_id in ids:
            outcomes = session.execute(
                select(Attempt.number, Attempt.outcome_code)
                .where(Attempt.job_id == job_id)
                .order_by(Attempt.number)
            ).all()
            assert [tuple(row) for row in outcomes] == [
                (1, OCR_FAILED),
                (2, OCR_FAILED),
                (3, "OK"),
            ]
            events = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "replay")
            ).all()
            assert [
                (e.actor, e.reason, e.previous_status, e.previous_error_code) for e in events
            ] == [("e2e@test", "OCR backend fixed", "failed", OCR_FAILED)]
            assert session.get(Result, job_id) is not None

    # The status view shows the whole story to an operator.
    shown = run_cli(env, "status", str(ids[0]), "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout.splitlines()[0])
    assert view["status"] == "succeeded"
    assert view["attempts"] == MAX_ATTEMPTS + 1

    # Replaying again is refused: they succeeded and --force was not given.
    again = run_cli(env, "replay", *map(str, ids[:1]))
    assert again.returncode == 1
    assert "use --force" in again.stderr
