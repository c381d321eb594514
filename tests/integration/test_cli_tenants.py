"""`jobs`, `status`, `stats` and `replay` act for MACAO_OCR_TENANT behind the tenant wall;
`--all-tenants` is the operator's explicit request for every tenant.

Against a migrated PostgreSQL (row-level security on) and the test Redis.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
from typer.testing import CliRunner, Result

from models import Attempt, JobStatus
from models.base import utcnow
from tests.fixtures.workers import sealed_job
from worker.cli import app

OURS, THEIRS = "tenant-ours", "tenant-theirs"


# The CLI configures logging for its process; under CliRunner that process is ours.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def db_url(fresh_migrated_database: Callable[[], str]) -> str:
    return fresh_migrated_database()


@pytest.fixture
def env(db_url: str, clean_redis: str) -> dict[str, str]:
    return {
        "MACAO_OCR_DATABASE_URL": db_url,
        "MACAO_OCR_BROKER_URL": clean_redis,
        "MACAO_OCR_REDIS_URL": clean_redis,
        "MACAO_OCR_TENANT": OURS,
        "MACAO_OCR_LOG_JSON": "true",
    }


@pytest.fixture
def ids(db_url: str) -> Iterator[dict[str, uuid.UUID]]:
    """Per tenant: one failed job (with an attempt) and one succeeded; written as the owner."""
    engine = sa.create_engine(db_url)
    made: dict[str, uuid.UUID] = {}
    now = utcnow()
    with sessionmaker(engine)() as session:
        for tenant, code in ((OURS, "FailedOperation.OcrFailed"), (THEIRS, "InternalError")):
            failed = sealed_job(
                tenant=tenant,
                status=JobStatus.failed,
                front_url="https://e.invalid/f.jpg",
                last_error_code=code,
                finished_at=now,
            )
            done = sealed_job(
                tenant=tenant, status=JobStatus.succeeded, front_url="https://e.invalid/s"
            )
            session.add_all([failed, done])
            session.flush()
            session.add(
                Attempt(
                    job_id=failed.id,
                    number=1,
                    outcome_code=code,
                    latency_ms=100 if tenant == OURS else 900,
                    started_at=now - timedelta(seconds=1),
                    finished_at=now,
                )
            )
            made[f"{tenant}/failed"], made[f"{tenant}/succeeded"] = failed.id, done.id
        session.commit()
    yield made
    engine.dispose()


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_jobs_lists_one_tenant_unless_asked_for_all(
    env: dict[str, str], ids: dict[str, uuid.UUID]
) -> None:
    ours = run(env, "jobs", "--json")
    assert ours.exit_code == 0, ours.output
    assert {v["job_id"] for v in lines(ours)} == {
        str(ids[f"{OURS}/failed"]),
        str(ids[f"{OURS}/succeeded"]),
    }
    assert all("tenant" not in v for v in lines(ours))

    every = run(env, "jobs", "--all-tenants", "--json")
    assert every.exit_code == 0, every.output
    assert {(v["job_id"], v["tenant"]) for v in lines(every)} == {
        (str(job_id), key.split("/")[0]) for key, job_id in ids.items()
    }
    human = run({**env, "COLUMNS": "200"}, "jobs", "--all-tenants")
    assert THEIRS in human.stdout and OURS in human.stdout


def test_status_of_another_tenants_job_is_not_found_unless_asked_for_all(
    env: dict[str, str], ids: dict[str, uuid.UUID]
) -> None:
    theirs = str(ids[f"{THEIRS}/failed"])
    walled = run(env, "status", theirs, "--json")
    assert walled.exit_code == 1
    assert lines(walled)[0]["status"] == "not_found"
    every = run(env, "status", theirs, "--all-tenants", "--json")
    assert every.exit_code == 0, every.output
    assert (lines(every)[0]["status"], lines(every)[0]["tenant"]) == ("failed", THEIRS)


def test_stats_count_one_tenant_unless_asked_for_all(
    env: dict[str, str], ids: dict[str, uuid.UUID]
) -> None:
    ours = run(env, "stats", "--json")
    assert ours.exit_code == 0, ours.output
    snapshot = json.loads(ours.stdout)
    assert snapshot["tenant"] == OURS
    assert snapshot["jobs_by_status"]["failed"] == 1
    assert snapshot["jobs_by_status"]["succeeded"] == 1
    assert snapshot["dead_letters"] == 1
    assert snapshot["calls_by_outcome"] == {"FailedOperation.OcrFailed": 1}
    assert snapshot["latency_p99_ms"] == 100.0

    every = json.loads(run(env, "stats", "--json", "--all-tenants").stdout)
    assert every["tenant"] is None
    assert every["jobs_by_status"]["failed"] == 2
    assert every["calls_by_outcome"] == {"FailedOperation.OcrFailed": 1, "InternalError": 1}
    # The table title says whose jobs (rich may wrap it: compare words).
    assert "Jobs (every tenant)" in " ".join(run(env, "stats", "--all-tenants").stdout.split())
    assert f"Jobs (tenant {OURS})" in " ".join(run(env, "stats").stdout.split())


def test_replay_touches_one_tenant_unless_asked_for_all(
    env: dict[str, str], ids: dict[str, uuid.UUID]
) -> None:
    ours = run(env, "replay", "--status", "failed", "--dry-run", "--json")
    assert ours.exit_code == 0, ours.output
    assert json.loads(ours.stdout)["replayed"] == [str(ids[f"{OURS}/failed"])]
    # Naming the other tenant's job by id: not found, as if it did not exist.
    by_id = run(env, "replay", str(ids[f"{THEIRS}/failed"]), "--dry-run", "--json")
    assert json.loads(by_id.stdout)["refused"] == [
        {"job_id": str(ids[f"{THEIRS}/failed"]), "code": "Replay.NotFound", "reason": "not found"}
    ]
    every = run(env, "replay", "--status", "failed", "--dry-run", "--json", "--all-tenants")
    assert every.exit_code == 0, every.output
    assert set(json.loads(every.stdout)["replayed"]) == {
        str(ids[f"{OURS}/failed"]),
        str(ids[f"{THEIRS}/failed"]),
    }


def test_a_real_replay_for_one_tenant_writes_behind_the_wall(
    env: dict[str, str], ids: dict[str, uuid.UUID], db_url: str
) -> None:
    ours = ids[f"{OURS}/failed"]
    result = run(env, "replay", str(ours), "--reason", "retry", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["replayed"] == [str(ours)]
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            statuses: dict[object, object] = dict(
                conn.execute(sa.text("SELECT id, status FROM job")).all()
            )
            events = conn.execute(sa.text("SELECT job_id, kind FROM job_event")).all()
    finally:
        engine.dispose()
    assert statuses[ours] == "queued"
    assert statuses[ids[f"{THEIRS}/failed"]] == "failed"
    assert events == [(ours, "replay")]
