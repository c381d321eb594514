"""`macao-ocr submit | status | jobs` against a migrated PostgreSQL and the real test Redis."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from models import Attempt, Job, JobStatus, Warning
from tests.fixtures.workers import sealed_job, sealed_result
from worker.broker.publish import QUEUE
from worker.cli import app

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# The CLI configures logging for its process; under CliRunner that process is ours.
pytestmark = pytest.mark.usefixtures("restore_logging")


def png(color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    # Above the pre-flight's minimum side (200 px by default).
    PILImage.new("RGB", (240, 200), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def db_url(fresh_migrated_database: Callable[[], str]) -> str:
    return fresh_migrated_database()


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = sa.create_engine(db_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def env(db_url: str, clean_redis: str) -> dict[str, str]:
    return {
        "MACAO_OCR_DATABASE_URL": db_url,
        "MACAO_OCR_BROKER_URL": clean_redis,
        "MACAO_OCR_REDIS_URL": clean_redis,
        "MACAO_OCR_TENANT": "tenant-cli",
        "MACAO_OCR_LOG_JSON": "true",
    }


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def queued_ids(redis_url: str) -> list[str]:
    messages = redis.Redis.from_url(redis_url).lrange(QUEUE, 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in messages]


def test_submit_one_file(
    env: dict[str, str], factory: sessionmaker[Session], tmp_path: Path
) -> None:
    front = tmp_path / "front.png"
    front.write_bytes(png())
    result = run(env, "submit", str(front), "--tag", "t1", "--portrait", "--json")
    assert result.exit_code == 0, result.stderr
    [obj] = lines(result)
    assert obj["status"] == "queued" and obj["tag"] == "t1" and obj["enqueued"] is True
    assert queued_ids(env["MACAO_OCR_BROKER_URL"]) == [obj["job_id"]]
    with factory() as session:
        job = session.get_one(Job, uuid.UUID(obj["job_id"]))
        assert (job.tenant, job.portrait, job.tag) == ("tenant-cli", True, "t1")
        assert job.enqueued_at is not None


def test_submit_manifest(
    env: dict[str, str], factory: sessionmaker[Session], tmp_path: Path
) -> None:
    for i in range(3):
        (tmp_path / f"c{i}.png").write_bytes(png((i, i, i)))
    manifest = tmp_path / "cards.csv"
    manifest.write_text(
        "front,back,tag\nc0.png,,a\nc1.png,c2.png,b\nhttps://example.com/x.jpg,,c\n"
    )
    result = run(env, "submit", "--manifest", str(manifest), "--batch", "B1", "--json")
    assert result.exit_code == 0, result.stderr
    objs = lines(result)
    assert [o["tag"] for o in objs] == ["a", "b", "c"]
    assert sorted(queued_ids(env["MACAO_OCR_BROKER_URL"])) == sorted(o["job_id"] for o in objs)
    with factory() as session:
        jobs = session.scalars(sa.select(Job)).all()
        assert len(jobs) == 3 and {j.batch for j in jobs} == {"B1"}


def test_bad_manifest_submits_nothing(
    env: dict[str, str], factory: sessionmaker[Session], tmp_path: Path
) -> None:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 32)
    manifest = tmp_path / "cards.csv"
    manifest.write_text("front,tag\nok.png,a\nanim.gif,b\nmissing.png,c\n")
    result = run(env, "submit", "--manifest", str(manifest), "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    error = json.loads(result.stderr.splitlines()[-1])["error"]
    assert error["code"] == "Input.manifest"
    problems = {p["line"]: p["message"] for p in error["problems"]}
    assert set(problems) == {3, 4}
    assert "gif_not_supported" in problems[3] and "missing.png" in problems[4]
    human = run(env, "submit", "--manifest", str(manifest))
    assert human.exit_code == 2
    assert "line 3" in human.stderr and "gif_not_supported" in human.stderr
    assert "line 4" in human.stderr and "missing.png" in human.stderr
    assert queued_ids(env["MACAO_OCR_BROKER_URL"]) == []
    with factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_bad_single_input(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    result = run(env, "submit", "/nonexistent/card.png")
    assert result.exit_code == 2
    assert "/nonexistent/card.png" in result.stderr and "file_not_found" in result.stderr
    result = run(env, "submit", "ftp://example.com/card.png")
    assert result.exit_code == 2 and "bad_url" in result.stderr
    result = run(env, "submit")
    assert result.exit_code == 2
    with factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_submit_with_broker_down_keeps_the_job(
    env: dict[str, str], factory: sessionmaker[Session], tmp_path: Path
) -> None:
    front = tmp_path / "front.png"
    front.write_bytes(png())
    down = {**env, "MACAO_OCR_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = run(down, "submit", str(front), "--json")
    assert result.exit_code == 0, result.stderr
    [obj] = lines(result)
    assert obj["enqueued"] is False
    assert "sweeper" in result.stderr
    with factory() as session:
        job = session.get_one(Job, uuid.UUID(obj["job_id"]))
        assert job.status == JobStatus.queued and job.enqueued_at is None


def _seed(factory: sessionmaker[Session]) -> dict[str, uuid.UUID]:
    ids = {name: uuid.uuid4() for name in ("ok", "failed", "queued", "other")}
    with factory() as session:
        session.add_all(
            [
                sealed_job(
                    id=ids["ok"],
                    tenant="tenant-cli",
                    status=JobStatus.succeeded,
                    front_url="https://e.com/1",
                    batch="B",
                    tag="t-ok",
                    attempts=1,
                    created_at=T0,
                ),
                sealed_job(
                    id=ids["failed"],
                    tenant="tenant-cli",
                    status=JobStatus.failed,
                    front_url="https://e.com/2",
                    batch="B",
                    attempts=1,
                    last_error_code="FailedOperation.ImageNoSpecifiedCard",
                    last_error_message="no card found",
                    created_at=T0 + timedelta(seconds=1),
                ),
                sealed_job(
                    id=ids["queued"],
                    tenant="tenant-cli",
                    front_url="https://e.com/3",
                    created_at=T0 + timedelta(seconds=2),
                ),
                sealed_job(id=ids["other"], tenant="someone-else", front_url="https://e.com/4"),
            ]
        )
        session.flush()
        session.add_all(
            [
                Attempt(job_id=ids["ok"], number=1, outcome_code="RequestLimitExceeded"),
                Attempt(job_id=ids["ok"], number=2, outcome_code="OK", request_id="req-ok"),
                Attempt(
                    job_id=ids["failed"],
                    number=1,
                    outcome_code="FailedOperation.ImageNoSpecifiedCard",
                ),
                sealed_result(
                    job_id=ids["ok"],
                    request_id="req-ok",
                    id_number="1234567(8)",
                    birthday=date(1990, 2, 3),
                    validity_period=None,
                    validity_period_text="永久",
                    height_m=Decimal("1.64"),
                ),
            ]
        )
        session.flush()
        session.add(Warning(job_id=ids["ok"], code=-9102, name="photocopy"))
        session.commit()
    return ids


def test_status_json_contract(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    ids = _seed(factory)
    result = run(
        env, "status", str(ids["ok"]), str(ids["failed"]), str(ids["other"]), "nope", "--json"
    )
    assert result.exit_code == 1  # two ids not found
    ok, failed, other, nope = lines(result)
    assert ok["job_id"] == str(ids["ok"]) and ok["status"] == "succeeded"
    assert ok["attempts"] == 2  # every API call, the throttled one included
    assert ok["error_code"] is None and ok["error_message"] is None
    assert ok["result"]["id_number"] == "1234567(8)"
    assert ok["result"]["birthday"] == "1990-02-03"
    assert ok["result"]["validity_period"] == "永久"
    assert ok["result"]["height"] == "1.64"
    assert ok["result"]["request_id"] == "req-ok"
    assert ok["warnings"] == [{"code": -9102, "name": "photocopy"}]
    assert "paused" in ok
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["error_code"] == "FailedOperation.ImageNoSpecifiedCard"
    assert failed["error_message"] == "no card found"
    assert failed["result"] is None and failed["warnings"] == []
    assert other == {"job_id": str(ids["other"]), "status": "not_found"}
    assert nope == {"job_id": "nope", "status": "not_found"}


def test_status_human(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    ids = _seed(factory)
    result = run(env, "status", str(ids["failed"]))
    assert result.exit_code == 0, result.stderr
    assert "failed" in result.stdout
    assert "FailedOperation.ImageNoSpecifiedCard" in result.stdout


def test_jobs_filters(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    ids = _seed(factory)
    everything = lines(run(env, "jobs", "--json"))
    # Newest first, this tenant only.
    assert [o["job_id"] for o in everything] == [
        str(ids["queued"]),
        str(ids["failed"]),
        str(ids["ok"]),
    ]
    assert [o["job_id"] for o in lines(run(env, "jobs", "--status", "failed", "--json"))] == [
        str(ids["failed"])
    ]
    by_code = run(env, "jobs", "--error-code", "FailedOperation.ImageNoSpecifiedCard", "--json")
    assert [o["job_id"] for o in lines(by_code)] == [str(ids["failed"])]
    assert len(lines(run(env, "jobs", "--batch", "B", "--json"))) == 2
    assert [o["tag"] for o in lines(run(env, "jobs", "--tag", "t-ok", "--json"))] == ["t-ok"]
    assert len(lines(run(env, "jobs", "--limit", "1", "--json"))) == 1
    human = run(env, "jobs")
    assert human.exit_code == 0 and str(ids["failed"])[:8] in human.stdout
    assert str(ids["failed"]) not in human.stdout
    assert str(ids["failed"]) in run(env, "jobs", "--full-ids").stdout
    assert run(env, "jobs", "--status", "lost").exit_code == 2


def test_jobs_fits_an_80_column_terminal(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    ids = _seed(factory)
    with factory() as session, session.begin():
        job = session.get(Job, ids["failed"])
        assert job is not None
        job.tag = "a-rather-long-customer-reference-tag-0042"
        job.batch = "batch-2026-11-25-onboarding-east"
    result = run({**env, "COLUMNS": "80"}, "jobs")
    assert result.exit_code == 0, result.stderr
    rows = result.stdout.splitlines()
    assert max(len(row) for row in rows) <= 80, rows
    # Every id is whole (never ellipsised) in its short form, and `status` takes it.
    for job_id in (ids["ok"], ids["failed"], ids["queued"]):
        assert str(job_id)[:8] in result.stdout
    shown = lines(run(env, "status", str(ids["failed"])[:8], "--json"))
    assert shown[0]["job_id"] == str(ids["failed"])


def test_status_history_in_table_output(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    ids = _seed(factory)
    result = run({**env, "COLUMNS": "100"}, "status", str(ids["ok"]), "--history")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "history" in out
    assert "call 1" in out and "RequestLimitExceeded" in out
    assert "call 2" in out and "req-ok" in out
    # Without --history, no history table.
    assert "call 1" not in run(env, "status", str(ids["ok"])).stdout


def test_status_shows_the_account_pause(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    import asyncio

    import redis.asyncio

    from worker.quota.circuit_redis import RedisAccountCircuit

    ids = _seed(factory)

    async def open_circuit() -> None:
        client = redis.asyncio.Redis.from_url(env["MACAO_OCR_REDIS_URL"])
        await RedisAccountCircuit(client).open("ResourceUnavailable.InArrears", "in arrears")
        await client.aclose()

    asyncio.run(open_circuit())
    [obj] = lines(run(env, "status", str(ids["queued"]), "--json"))
    assert obj["paused"]["code"] == "ResourceUnavailable.InArrears"
    assert obj["paused"]["message"] == "in arrears"
    assert obj["paused"]["since"]
    human = run(env, "status", str(ids["queued"]))
    assert human.exit_code == 0
    assert "PAUSED" in human.stdout and "ResourceUnavailable.InArrears" in human.stdout


def test_status_when_redis_is_unreachable(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    ids = _seed(factory)
    down = {**env, "MACAO_OCR_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = run(down, "status", str(ids["queued"]), "--json")
    assert result.exit_code == 0, result.stderr
    [obj] = lines(result)
    assert obj["status"] == "queued" and obj["paused"] is None
    assert obj["pause_state"] == "unavailable"
    human = run(down, "status", str(ids["queued"]))
    assert human.exit_code == 0 and "unavailable" in human.stderr
