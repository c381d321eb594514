"""The HTTP API behind PostgreSQL's tenant wall: every request's database work runs as the
`macao_ocr_tenant` role with the caller's tenant set, so row-level security, not only the
queries' WHERE clauses, keeps a caller to its own rows.

In process (FastAPI's TestClient) over a real, migrated PostgreSQL. The test login is the
superuser `postgres`, which bypasses row-level security unless it switches role: an API that
used the login's own (cross-tenant) role would fail both tests.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from models import Batch, Job
from worker.broker.publish import RecordingPublisher
from worker.http import routes_batches, routes_jobs
from worker.http.app import create_app
from worker.http.problems import not_found
from worker.settings import Settings
from worker.store.engine import TENANT_ROLE, TENANT_SETTING
from worker.tenants import create_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

URL_JOB = {"front": {"url": "https://cards.example/front.jpg"}}


@pytest.fixture
def client(fresh_migrated_database: Callable[[], str]) -> Iterator[TestClient]:
    app = create_app(
        Settings(database_url=fresh_migrated_database(), qps=0), publisher=RecordingPublisher()
    )
    with TestClient(app) as test_client:
        yield test_client


def _key(client: TestClient, tenant: str) -> dict[str, str]:
    made = create_key(client.app.state.services.session_factory, tenant)  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {made.api_key}"}


def test_every_statement_of_a_request_runs_as_the_callers_tenant(client: TestClient) -> None:
    """Each statement the API sends is followed by a look at who ran it. Only the key lookup
    (which finds the tenant) runs as the login; everything else as the tenant role with the
    caller's tenant."""
    svc = client.app.state.services  # type: ignore[attr-defined]
    engines = {svc.engine, svc.key_sessions.kw["bind"]}
    seen: list[tuple[str, str, str | None]] = []

    def who_ran(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        probe = cursor.connection.execute(
            "SELECT current_user, current_setting(%s, true)", (TENANT_SETTING,)
        ).fetchone()
        seen.append((statement, probe[0], probe[1]))

    a, b = _key(client, "acme"), _key(client, "globex")
    for engine in engines:
        sa.event.listen(engine, "after_cursor_execute", who_ran)
    try:
        made = client.post("/v1/jobs", json={**URL_JOB, "batch": "day-1"}, headers=a)
        assert made.status_code == 201, made.text
        job_id = made.json()["job_id"]
        keyed = {**a, "Idempotency-Key": "k-1"}
        assert client.post("/v1/jobs", json=URL_JOB, headers=keyed).status_code == 201
        assert client.post("/v1/jobs", json=URL_JOB, headers=keyed).status_code == 200
        batch = client.post("/v1/batches", json={"jobs": [URL_JOB] * 3}, headers=a)
        assert batch.status_code == 201, batch.text
        assert client.get(f"/v1/batches/{batch.json()['batch_id']}", headers=a).status_code == 200
        assert client.get(f"/v1/jobs/{job_id}?history=true", headers=a).status_code == 200
        assert client.get("/v1/jobs?batch=day-1", headers=a).json()["jobs"]
        assert client.get(f"/v1/jobs/{job_id}/portrait", headers=a).status_code == 404
        assert client.post(f"/v1/jobs/{job_id}/replay", headers=a).status_code == 409
        assert client.get(f"/v1/jobs/{job_id}", headers=b).status_code == 404
    finally:
        for engine in engines:
            sa.event.remove(engine, "after_cursor_execute", who_ran)
    key_lookups = [s for s in seen if "api_key" in s[0]]
    tenant_work = [s for s in seen if "api_key" not in s[0]]
    assert key_lookups and len(tenant_work) > 20
    assert {role for _, role, _ in key_lookups} == {"postgres"}
    wrong = {(s.split()[0], role, tenant) for s, role, tenant in tenant_work} - {
        (verb, TENANT_ROLE, t)
        for verb in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")
        for t in ("acme", "globex")
    }
    assert wrong == set()
    assert {t for _, _, t in tenant_work} == {"acme", "globex"}


def test_row_level_security_walls_a_query_that_forgets_its_tenant(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job and batch lookups lose their `tenant =` filter (the bug the wall is for):
    another tenant's job and batch are still 404, because PostgreSQL hides their rows."""
    a, b = _key(client, "acme"), _key(client, "globex")
    job_id = client.post("/v1/jobs", json=URL_JOB, headers=a).json()["job_id"]
    batch_id = client.post("/v1/batches", json={"jobs": [URL_JOB]}, headers=a).json()["batch_id"]

    def load_job(session: Any, _tenant: str, wanted: uuid.UUID) -> Job:
        job = session.scalars(select(Job).where(Job.id == wanted)).first()
        if job is None:
            raise not_found("job")
        return job  # type: ignore[no-any-return]

    def load_batch(svc: Any, tenant: str, wanted: uuid.UUID) -> Batch:
        with svc.sessions(tenant)() as session:
            batch = session.scalars(select(Batch).where(Batch.id == wanted)).first()
        if batch is None:
            raise not_found("batch")
        return batch  # type: ignore[no-any-return]

    monkeypatch.setattr(routes_jobs, "_load", load_job)
    monkeypatch.setattr(routes_batches, "_load", load_batch)
    # The unfiltered lookups do work: the owner still reads its own rows through them.
    assert client.get(f"/v1/jobs/{job_id}", headers=a).status_code == 200
    assert client.get(f"/v1/batches/{batch_id}", headers=a).status_code == 200
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/portrait", f"/v1/batches/{batch_id}"):
        theirs = client.get(path, headers=b)
        assert theirs.status_code == 404, (path, theirs.text)
    assert client.post(f"/v1/jobs/{job_id}/replay", headers=b).status_code == 404
