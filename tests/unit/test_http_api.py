"""The HTTP API in process (FastAPI's TestClient) over a migrated SQLite database and a
recording publisher: auth, tenant isolation, idempotency, batches, backpressure, limits,
pagination. The end-to-end test (a real server, worker and PostgreSQL) is in
tests/integration/test_http_e2e.py."""

from __future__ import annotations

import base64
import json
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

import migrations
from emulator.specimen import make_specimen
from models import ApiKey, Batch, Job, JobStatus
from worker.broker.publish import RecordingPublisher
from worker.cli import app as cli_app
from worker.http.app import create_app
from worker.settings import Settings
from worker.tenants import authenticate, create_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

URL_JOB = {"front": {"url": "https://cards.example/front.jpg"}}


class Api:
    def __init__(self, client: TestClient, publisher: RecordingPublisher) -> None:
        self.client = client
        self.publisher = publisher
        self.services = client.app.state.services  # type: ignore[attr-defined]
        self.keys: dict[str, str] = {}

    def key(self, tenant: str) -> dict[str, str]:
        if tenant not in self.keys:
            self.keys[tenant] = create_key(self.services.session_factory, tenant).api_key
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def jobs_stored(self) -> int:
        with self.services.session_factory() as session:
            return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _make(tmp_path: Path, **settings: Any) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrations.upgrade(url)
    publisher = RecordingPublisher()
    app = create_app(Settings(database_url=url, **settings), publisher=publisher)
    with TestClient(app) as client:
        yield Api(client, publisher)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from _make(tmp_path, qps=0)


KEY_CACHE_S = 0.5


@pytest.fixture
def cached_keys(tmp_path: Path) -> Iterator[Api]:
    yield from _make(tmp_path, qps=0, http_key_cache_s=KEY_CACHE_S)


def test_auth_missing_unknown_and_revoked_keys_get_401(cached_keys: Api, tmp_path: Path) -> None:
    api = cached_keys
    assert api.client.get("/v1/jobs").status_code == 401
    bad = api.client.get("/v1/jobs", headers={"Authorization": "Bearer mocr_nope"})
    assert bad.status_code == 401
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["code"] == "unauthorized" and bad.headers["www-authenticate"] == "Bearer"
    headers = api.key("acme")
    assert api.client.get("/v1/jobs", headers=headers).status_code == 200
    runner = CliRunner()
    env = {"MACAO_OCR_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}"}
    listed = runner.invoke(cli_app, ["tenants", "keys", "acme", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["last_used_at"] is not None and row["revoked_at"] is None
    revoked = runner.invoke(cli_app, ["tenants", "revoke", row["key_id"]], env=env)
    assert revoked.exit_code == 0, revoked.output
    # Remembered by the server process for at most http_key_cache_s: then refused.
    time.sleep(KEY_CACHE_S + 0.1)
    assert api.client.get("/v1/jobs", headers=headers).status_code == 401


def test_a_valid_key_is_looked_up_once_per_cache_period(
    cached_keys: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = cached_keys.key("acme")
    lookups: list[str] = []
    real = authenticate

    def counted(sessions: Any, api_key: str) -> Any:
        lookups.append(api_key)
        return real(sessions, api_key)

    monkeypatch.setattr("worker.http.keys.authenticate", counted)
    for _ in range(3):
        assert cached_keys.client.get("/v1/jobs", headers=headers).status_code == 200
    assert len(lookups) == 1
    time.sleep(KEY_CACHE_S + 0.1)
    assert cached_keys.client.get("/v1/jobs", headers=headers).status_code == 200
    assert len(lookups) == 2
    # An unknown key is looked up every time: guesses are not remembered.
    for _ in range(2):
        bad = {"Authorization": "Bearer mocr_nope"}
        assert cached_keys.client.get("/v1/jobs", headers=bad).status_code == 401
    assert len(lookups) == 4


def test_tenants_cli_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrations.upgrade(url)
    env = {"MACAO_OCR_DATABASE_URL": url}
    runner = CliRunner()
    made = runner.invoke(cli_app, ["tenants", "create", "acme", "--json"], env=env)
    assert made.exit_code == 0, made.output
    doc = json.loads(made.stdout)
    assert doc["tenant"] == "acme" and doc["api_key"].startswith("mocr_")
    assert doc["api_key"].encode() not in (tmp_path / "cli.db").read_bytes()
    listed = runner.invoke(cli_app, ["tenants", "list", "--json"], env=env)
    assert json.loads(listed.stdout)["active_keys"] == 1
    bad = runner.invoke(cli_app, ["tenants", "create", "no spaces"], env=env)
    assert bad.exit_code == 2 and "tenant_name" in bad.output
    assert runner.invoke(cli_app, ["tenants", "revoke", "key_unknown"], env=env).exit_code == 1
    assert runner.invoke(cli_app, ["tenants", "keys", "ghost"], env=env).exit_code == 1


def test_another_tenants_job_batch_and_portrait_are_404(api: Api) -> None:
    a, b = api.key("a"), api.key("b")
    job = api.client.post("/v1/jobs", json={**URL_JOB, "portrait": True}, headers=a)
    assert job.status_code == 201
    job_id = job.json()["job_id"]
    assert job.headers["location"] == f"/v1/jobs/{job_id}"
    batch = api.client.post("/v1/batches", json={"jobs": [URL_JOB]}, headers=a).json()
    for path in (
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/portrait",
        f"/v1/batches/{batch['batch_id']}",
    ):
        assert api.client.get(path, headers=a).status_code in (200, 404)
        theirs = api.client.get(path, headers=b)
        assert theirs.status_code == 404, path
        assert theirs.headers["content-type"] == "application/problem+json"
    assert api.client.post(f"/v1/jobs/{job_id}/replay", headers=b).status_code == 404
    assert api.client.get("/v1/jobs", headers=b).json()["jobs"] == []
    assert api.client.get(f"/v1/jobs/{job_id}", headers=a).status_code == 200


def test_refused_input_is_422_with_the_rule_and_stores_nothing(api: Api) -> None:
    h = api.key("a")
    cases = {
        "bad_url": {"front": {"url": "ftp://x/y.jpg"}},
        "not_png_or_jpeg": {"front": {"base64": base64.b64encode(b"GIF8").decode()}},
        "bad_base64": {"front": {"base64": "not base64!"}},
        "image_source": {"front": {}},
        "no_image": {"portrait": True},
    }
    for rule, body in cases.items():
        answer = api.client.post("/v1/jobs", json=body, headers=h)
        assert answer.status_code == 422, (rule, answer.text)
        assert answer.json()["rule"] == rule
    # A path is never read from the server's disk.
    local = api.client.post("/v1/jobs", json={"front": {"url": "/etc/passwd"}}, headers=h)
    assert local.status_code == 422 and local.json()["rule"] == "bad_url"
    assert api.jobs_stored() == 0 and api.publisher.published == []


def test_multipart_and_json_submit_one_job_under_one_idempotency_key(api: Api) -> None:
    h = api.key("a")
    image = make_specimen(seed=3).image
    first = api.client.post(
        "/v1/jobs",
        files={"front": ("card.jpg", image, "image/jpeg")},
        data={"tag": "t1", "portrait": "true"},
        headers={**h, "Idempotency-Key": "order-1"},
    )
    assert first.status_code == 201, first.text
    assert first.json()["portrait"] is True and first.json()["tag"] == "t1"
    again = api.client.post(
        "/v1/jobs",
        json={"front": {"base64": base64.b64encode(image).decode()}, "tag": "t1", "portrait": True},
        headers={**h, "Idempotency-Key": "order-1"},
    )
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["job_id"] == first.json()["job_id"]
    other = api.client.post("/v1/jobs", json=URL_JOB, headers={**h, "Idempotency-Key": "order-1"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    # Keys are per tenant: another tenant's same key is its own.
    b = api.client.post(
        "/v1/jobs", json=URL_JOB, headers={**api.key("b"), "Idempotency-Key": "order-1"}
    )
    assert b.status_code == 201
    assert api.jobs_stored() == 2


def test_a_refused_request_frees_its_idempotency_key(api: Api) -> None:
    h = {**api.key("a"), "Idempotency-Key": "k"}
    assert (
        api.client.post("/v1/jobs", json={"front": {"url": "ftp://x"}}, headers=h).status_code
        == 422
    )
    assert api.client.post("/v1/jobs", json=URL_JOB, headers=h).status_code == 201


def test_a_batch_with_bad_jobs_lists_every_bad_index_and_stores_nothing(api: Api) -> None:
    h = api.key("a")
    jobs = [URL_JOB, {"front": {"url": "nope"}}, URL_JOB, {"front": {"base64": "!!"}}]
    answer = api.client.post("/v1/batches", json={"name": "b", "jobs": jobs}, headers=h)
    assert answer.status_code == 422
    assert [e["index"] for e in answer.json()["errors"]] == [1, 3]
    assert api.jobs_stored() == 0
    with api.services.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 0


def test_a_batch_repeating_a_bad_image_lists_each_of_its_jobs(api: Api) -> None:
    card = make_specimen(seed=5).image
    good = {"front": {"base64": base64.b64encode(card).decode()}}
    cut = {"front": {"base64": base64.b64encode(card[: len(card) // 2]).decode()}}
    jobs = [cut, good, cut, good, cut]
    answer = api.client.post("/v1/batches", json={"jobs": jobs}, headers=api.key("a"))
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert [e["index"] for e in errors] == [0, 2, 4]
    assert {e["rule"] for e in errors} == {"image_undecodable"}
    assert api.jobs_stored() == 0


def test_a_batch_is_created_counted_and_answered_again(api: Api) -> None:
    h = {**api.key("a"), "Idempotency-Key": "batch-1"}
    body = {"name": "march", "jobs": [URL_JOB] * 3}
    made = api.client.post("/v1/batches", json=body, headers=h)
    assert made.status_code == 201, made.text
    ids = [j["job_id"] for j in made.json()["jobs"]]
    assert len(set(ids)) == 3 and api.publisher.published == [uuid.UUID(i) for i in ids]
    again = api.client.post("/v1/batches", json=body, headers=h)
    assert again.status_code == 200 and again.json() == made.json()
    assert api.client.post("/v1/batches", json={**body, "name": "x"}, headers=h).status_code == 409
    progress = api.client.get(f"/v1/batches/{made.json()['batch_id']}", headers=h).json()
    assert progress["total"] == 3 and progress["completed"] is False
    assert progress["counts"] == {"pending": 3, "succeeded": 0, "failed": 0}
    listed = api.client.get(f"/v1/jobs?batch={made.json()['batch_id']}", headers=h).json()
    assert sorted(j["job_id"] for j in listed["jobs"]) == sorted(ids)
    assert api.jobs_stored() == 3


def test_keyset_pages_cover_every_job_once(api: Api) -> None:
    h = api.key("a")
    made = {api.client.post("/v1/jobs", json=URL_JOB, headers=h).json()["job_id"] for _ in range(7)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get("/v1/jobs", params=params, headers=h).json()
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 and set(seen) == made
    assert api.client.get("/v1/jobs?cursor=zz", headers=h).json()["code"] == "invalid_cursor"


def test_backlog_over_the_quota_gets_429_with_retry_after(tmp_path: Path) -> None:
    for api in _make(tmp_path, qps=1, max_backlog_s=2):
        h = api.key("a")
        assert api.client.post("/v1/jobs", json=URL_JOB, headers=h).status_code == 201
        assert api.client.post("/v1/jobs", json=URL_JOB, headers=h).status_code == 201
        full = api.client.post("/v1/jobs", json=URL_JOB, headers=h)
        assert full.status_code == 429 and full.json()["code"] == "backlog_full"
        assert int(full.headers["retry-after"]) >= 1
        batch = api.client.post("/v1/batches", json={"jobs": [URL_JOB]}, headers=h)
        assert batch.status_code == 429
        # Another tenant's backlog is its own.
        assert api.client.post("/v1/jobs", json=URL_JOB, headers=api.key("b")).status_code == 201
        assert api.jobs_stored() == 3


def test_bodies_over_the_limit_are_refused_before_being_read(api: Api) -> None:
    h = {**api.key("a"), "content-type": "application/json"}
    declared = api.client.post("/v1/jobs", content=b"x" * (11 * 1024 * 1024), headers=h)
    assert declared.status_code == 413 and declared.json()["code"] == "body_too_large"

    def stream() -> Iterator[bytes]:
        for _ in range(40):  # 40 MiB, without a Content-Length: the streamed cap answers
            yield b"x" * (1024 * 1024)

    streamed = api.client.post("/v1/jobs", content=stream(), headers=h)
    assert streamed.status_code == 413
    assert api.jobs_stored() == 0


def test_openapi_document_and_health(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/batches", "/v1/batches/{batch_id}/replay"):
        assert path in doc["paths"]
    assert "Problem" in doc["components"]["schemas"]
    assert api.client.get("/docs").status_code == 200
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_an_anonymous_batch_is_refused_before_its_body_is_parsed(api: Api) -> None:
    answer = api.client.post(
        "/v1/batches", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 401
    h = api.key("a")
    bad = api.client.post(
        "/v1/batches", content=b"{not json", headers={**h, "content-type": "application/json"}
    )
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
    empty = api.client.post("/v1/batches", json={"jobs": []}, headers=h)
    assert empty.status_code == 422


def test_replays_are_audited_with_the_key_id_and_move_the_batch_counters(api: Api) -> None:
    from sqlalchemy import update

    from models import JobEvent
    from worker.store import terminal

    h = api.key("a")
    made = api.client.post("/v1/batches", json={"jobs": [URL_JOB, URL_JOB]}, headers=h).json()
    batch_id = made["batch_id"]
    ids = [uuid.UUID(j["job_id"]) for j in made["jobs"]]
    with api.services.session_factory() as session, session.begin():
        for job_id, code in zip(ids, ("FailedOperation.OcrFailed", "X.Other"), strict=True):
            session.execute(
                update(Job).where(Job.id == job_id).values(status="failed", last_error_code=code)
            )
            terminal.on_job_terminal(session.connection(), job_id, JobStatus.failed)
    progress = api.client.get(f"/v1/batches/{batch_id}", headers=h).json()
    assert progress["completed"] is True and progress["counts"]["failed"] == 2
    answer = api.client.post(
        f"/v1/batches/{batch_id}/replay",
        params={"error_code": "FailedOperation.OcrFailed"},
        headers=h,
    )
    assert answer.status_code == 200 and answer.json()["replayed"] == [str(ids[0])]
    progress = api.client.get(f"/v1/batches/{batch_id}", headers=h).json()
    assert progress["counts"] == {"pending": 1, "succeeded": 0, "failed": 1}
    assert api.client.post(f"/v1/jobs/{ids[0]}/replay", headers=h).status_code == 409
    one = api.client.post(f"/v1/jobs/{ids[1]}/replay", json={"reason": "retry"}, headers=h)
    assert one.status_code == 200 and one.json()["replayed"] == [str(ids[1])]
    with api.services.session_factory() as session:
        actors = set(session.scalars(select(JobEvent.actor)))
    with api.services.session_factory() as session:
        [key_id] = session.scalars(select(ApiKey.id).where(ApiKey.tenant == "a")).all()
    assert actors == {f"api:{key_id}"}
    assert (
        api.client.post(f"/v1/batches/{batch_id}/replay", headers=api.key("b")).status_code == 404
    )


def test_expired_idempotency_keys_are_purged_and_reusable(api: Api) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from models import IdempotencyKey
    from models.base import utcnow
    from worker.http import idempotency

    h = {**api.key("a"), "Idempotency-Key": "old"}
    first = api.client.post("/v1/jobs", json=URL_JOB, headers=h).json()["job_id"]
    # A key never used again: only the purge removes it.
    stale = {**h, "Idempotency-Key": "stale"}
    assert api.client.post("/v1/jobs", json=URL_JOB, headers=stale).status_code == 201
    with api.services.session_factory() as session, session.begin():
        session.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=25)))
    idempotency._last_purge.clear()
    second = api.client.post(
        "/v1/jobs", json={"front": {"url": "https://x.example/b.jpg"}}, headers=h
    )
    assert second.status_code == 201 and second.json()["job_id"] != first
    with api.services.session_factory() as session:
        assert session.scalars(select(IdempotencyKey.key)).all() == ["old"]


def _store_result(api: Api, job_id: str, id_number: str, portrait: bytes | None = None) -> None:
    import uuid

    from worker.store import job_sql
    from worker.tencent.types import OcrResult

    result = OcrResult(request_id="r", id_number=id_number, portrait=portrait)
    with api.services.engine.begin() as conn:
        job_sql.insert_result(
            conn, uuid.UUID(job_id), result, portrait is not None, sealer=api.services.sealer
        )


def test_jobs_by_id_number_through_the_keyed_hash_within_the_tenant(api: Api) -> None:
    a, b = api.key("a"), api.key("b")
    ids = [api.client.post("/v1/jobs", json=URL_JOB, headers=h).json()["job_id"] for h in (a, a, b)]
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    _store_result(api, ids[0], "1234567(8)", portrait=png)
    _store_result(api, ids[1], "7654321(0)")
    _store_result(api, ids[2], "1234567(8)")
    mine = api.client.get("/v1/jobs", params={"id_number": " 1234567(8)"}, headers=a).json()
    assert [j["job_id"] for j in mine["jobs"]] == [ids[0]]
    assert mine["jobs"][0]["result"]["id_number"] == "1234567(8)"
    theirs = api.client.get("/v1/jobs", params={"id_number": "1234567(8)"}, headers=b).json()
    assert [j["job_id"] for j in theirs["jobs"]] == [ids[2]]
    portrait = api.client.get(f"/v1/jobs/{ids[0]}/portrait", headers=a)
    assert portrait.status_code == 200 and portrait.content == png


def test_jobs_by_id_number_without_a_lookup_key_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MACAO_OCR_LOOKUP_KEY")
    for api in _make(tmp_path, qps=0):
        answer = api.client.get("/v1/jobs", params={"id_number": "1"}, headers=api.key("a"))
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/problem+json"
        assert "MACAO_OCR_LOOKUP_KEY" in answer.json()["detail"]
