"""The access log on a committed PostgreSQL database: each read of a result's personal fields
(CLI `status`, `jobs --json`; the HTTP API's job, list and portrait) writes one row, reads that
show none write nothing, and `macao-ocr audit` lists them behind the tenant wall."""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from models import AccessLog
from tests.fixtures.workers import sealer_for_tests
from tests.integration.test_retention import now, specimen, submit, succeed
from worker.broker.publish import RecordingPublisher
from worker.cli import app as cli_app
from worker.http.app import create_app
from worker.settings import Settings
from worker.store.retention import purge
from worker.tenants import create_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TENANT = "acme"
# The CLI configures logging for its process; under CliRunner that process is pytest's.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def db_url(fresh_migrated_database: Callable[[], str]) -> str:
    return fresh_migrated_database()


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = sa.create_engine(db_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def cli(db_url: str, *args: str, tenant: str = TENANT) -> Result:
    env = {"MACAO_OCR_DATABASE_URL": db_url, "MACAO_OCR_TENANT": tenant}
    return CliRunner().invoke(cli_app, list(args), env=env)


def log_rows(factory: sessionmaker[Session]) -> list[tuple[Any, ...]]:
    with factory() as session:
        rows = session.execute(
            select(AccessLog.actor, AccessLog.tenant, AccessLog.job_id, AccessLog.how).order_by(
                AccessLog.id
            )
        ).all()
    return [tuple(row) for row in rows]


def jobs(factory: sessionmaker[Session], db_url: str) -> tuple[uuid.UUID, uuid.UUID]:
    settings = Settings(database_url=db_url, tenant=TENANT)
    done, waiting = submit(factory, settings, specimen(21), specimen(22))
    succeed(factory, done)
    return done, waiting


def test_each_cli_read_that_shows_personal_fields_writes_one_row(
    factory: sessionmaker[Session], db_url: str
) -> None:
    done, waiting = jobs(factory, db_url)

    shown = cli(db_url, "status", str(done), "--json")
    assert shown.exit_code == 0, shown.output
    [(actor, tenant, job_id, how)] = log_rows(factory)
    assert (tenant, job_id, how) == (TENANT, done, "cli.status") and "@" in actor

    # A job without a result shows nothing personal; neither does the `jobs` table.
    assert cli(db_url, "status", str(waiting)).exit_code == 0
    assert cli(db_url, "jobs").exit_code == 0
    assert len(log_rows(factory)) == 1
    # `jobs --json` prints the result: one row per job that has one.
    assert cli(db_url, "jobs", "--json").exit_code == 0
    assert [(r[2], r[3]) for r in log_rows(factory)[1:]] == [(done, "cli.jobs")]
    # The human status shows the fields too.
    assert cli(db_url, "status", str(done)).exit_code == 0
    assert len(log_rows(factory)) == 3

    # Once retention deleted them, a read shows nothing personal and is not logged.
    settings = Settings(database_url=db_url)
    purge(factory, settings, now=now() + timedelta(seconds=settings.result_retention_s + 1))
    assert cli(db_url, "status", str(done), "--json").exit_code == 0
    assert len(log_rows(factory)) == 3

    listed = cli(db_url, "audit", "--json", "--job", str(done))
    assert listed.exit_code == 0, listed.output
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["how"] for e in entries] == ["cli.status", "cli.jobs", "cli.status"]  # newest first
    assert {e["job_id"] for e in entries} == {str(done)}
    # Another tenant's audit sees none of it (the wall, not only the filter).
    assert cli(db_url, "audit", "--json", tenant="other").stdout == ""


def test_the_python_surface_logs_its_reads_too(factory: sessionmaker[Session], db_url: str) -> None:
    from worker.service import get_job

    done, waiting = jobs(factory, db_url)
    settings = Settings(database_url=db_url, tenant=TENANT)
    view = get_job(factory, settings, done, sealer=sealer_for_tests())
    assert view is not None and view["result"] is not None
    assert (
        get_job(factory, settings, waiting, sealer=sealer_for_tests()) is not None
    )  # no result: nothing personal
    [(actor, tenant, job_id, how)] = log_rows(factory)
    assert (tenant, job_id, how) == (TENANT, done, "python.get_job") and "@" in actor


def test_each_http_read_writes_one_row_with_the_key_as_actor(
    factory: sessionmaker[Session], db_url: str
) -> None:
    done, waiting = jobs(factory, db_url)
    app = create_app(Settings(database_url=db_url, qps=0), publisher=RecordingPublisher())
    with TestClient(app) as client:
        key = create_key(app.state.services.session_factory, TENANT)
        headers = {"Authorization": f"Bearer {key.api_key}"}
        assert client.get(f"/v1/jobs/{done}", headers=headers).status_code == 200
        assert client.get(f"/v1/jobs/{waiting}", headers=headers).status_code == 200
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        portrait = client.get(f"/v1/jobs/{done}/portrait", headers=headers)
        assert portrait.status_code == 200
    actor = f"key:{key.key_id}"
    assert log_rows(factory) == [
        (actor, TENANT, done, "api.job"),
        (actor, TENANT, done, "api.jobs"),
        (actor, TENANT, done, "api.portrait"),
    ]
