"""A poison job end to end: a real worker process, real Redis and PostgreSQL, the emulator
returning an ID number far longer than a real one (40 characters).

The result columns are unbounded now, so a long ID alone no longer fails to store. The store
failure this test needs is made honestly, in the test's own database: a CHECK constraint
that refuses an ID number over 32 characters (exactly what the old VARCHAR(32) did). The job
must be bought once, fail as Internal.StoreFailed, stay failed over several lease periods
(the sweeper must not take it back), and after the "fix" (the constraint dropped)
`macao-ocr replay` stores the kept answer with no new call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from emulator.specimen import make_specimen
from models import Job, JobStatus, KeptAnswer, Result
from tests.fixtures.workers import cli_env, sealer_for_tests, submit_jobs
from worker.producer import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG_ID = "7654321(0)" * 4
# The lease a claim takes is lease_s + max_quota_wait_s: 3 s here.
LEASE_S = 2.0
MAX_QUOTA_WAIT_S = 1.0
LEASE_PERIOD_S = LEASE_S + MAX_QUOTA_WAIT_S
# The ID number is sealed (34 bytes of envelope around it): 40 characters are over 66 bytes.
ID_LIMIT = (
    "ALTER TABLE result ADD CONSTRAINT ck_test_id_limit CHECK (octet_length(id_number) <= 66)"
)


@pytest.fixture
def deployment(worker_env: dict[str, str]) -> Iterator[tuple[dict[str, str], sa.Engine]]:
    env = dict(
        worker_env,
        MACAO_OCR_LEASE_S=str(LEASE_S),
        MACAO_OCR_MAX_QUOTA_WAIT_S=str(MAX_QUOTA_WAIT_S),
        MACAO_OCR_SWEEP_INTERVAL_S="0.3",
    )
    engine = sa.create_engine(env["MACAO_OCR_DATABASE_URL"])
    yield env, engine
    engine.dispose()


def submit(env: dict[str, str], engine: sa.Engine, seed: int) -> uuid.UUID:
    image = make_specimen(seed, answer={"ID": LONG_ID}).image
    factory = sessionmaker(engine, expire_on_commit=False)
    [job_id] = submit_jobs(env, factory, [JobSpec(front=image)])
    return job_id


def job_row(engine: sa.Engine, job_id: uuid.UUID) -> Job:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def wait_status(
    engine: sa.Engine, emulator: Any, job_id: uuid.UUID, status: JobStatus, timeout_s: float
) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = job_row(engine, job_id)
        calls = emulator.counters()["total"]
        if job.status is status:
            return job
        assert calls <= 1 or status is JobStatus.succeeded, (
            f"bought {calls} times; job {job.status.value}, {job.last_error_code}"
        )
        if time.monotonic() > deadline:
            pytest.fail(f"job still {job.status.value} ({job.last_error_code}), {calls} calls")
        time.sleep(0.2)


def test_a_job_whose_answer_cannot_be_stored_is_bought_once_and_replayed_without_a_call(
    deployment: tuple[dict[str, str], sa.Engine], emulator: Any, celery_workers: Any
) -> None:
    env, engine = deployment
    with engine.begin() as conn:
        conn.execute(sa.text(ID_LIMIT))
    workers = celery_workers(env, n=1, concurrency=4)
    job_id = submit(env, engine, seed=31)

    job = wait_status(engine, emulator, job_id, JobStatus.failed, 60)
    assert job.last_error_code == "Internal.StoreFailed"
    assert job.last_error_message is not None and "IntegrityError" in job.last_error_message

    # Several lease periods later: still one paid answer, still failed (nothing took it back).
    time.sleep(4 * LEASE_PERIOD_S)
    assert emulator.counters()["by_code"] == {"OK": 1}
    job = job_row(engine, job_id)
    assert job.status is JobStatus.failed and job.api_calls == 1
    with Session(engine) as session:
        kept = session.get(KeptAnswer, job_id)
        assert kept is not None and LONG_ID.encode() not in kept.response_json
        answer = sealer_for_tests().open_answer(job_id, kept.response_json)
        assert json.loads(answer)["ID"] == LONG_ID
    log = workers.log_text()
    assert "job_store_failed" in log
    assert LONG_ID not in log and "7654321" not in log  # never the answer in a log

    # The fix: the constraint goes. The replay stores the kept answer; no call, no message.
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE result DROP CONSTRAINT ck_test_id_limit"))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "macao-ocr"), "replay", str(job_id), "--json"],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stored_without_call"] == [str(job_id)]
    job = job_row(engine, job_id)
    assert job.status is JobStatus.succeeded and job.api_calls == 1
    with Session(engine) as session:
        result = session.get(Result, job_id)
        assert result is not None
        assert sealer_for_tests().open_result(result).id_number == LONG_ID
        assert session.get(KeptAnswer, job_id) is None
    time.sleep(2 * LEASE_PERIOD_S)
    assert emulator.counters()["total"] == 1

    # And with no constraint in the way, a 40-character ID is simply stored (bought once).
    second = submit(env, engine, seed=32)
    wait_status(engine, emulator, second, JobStatus.succeeded, 60)
    assert emulator.counters()["total"] == 2
