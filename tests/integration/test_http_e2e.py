"""The HTTP API end to end: `macao-ocr api` (a real uvicorn process) and a real Celery worker
against the emulator, real Redis and PostgreSQL; two tenants with keys made by the CLI.

JSON, multipart and batch submits are read to the end; idempotency (a replay, a conflict,
20 concurrent requests under one key make one job); tenant B sees none of A's job, batch or
portrait (404); missing, unknown and revoked keys get 401."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from emulator.specimen import make_specimen
from tests.fixtures.api_server import ApiServer, create_tenant
from tests.fixtures.workers import REPO_ROOT, StartWorkers, cli_env
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TERMINAL = {"succeeded", "failed"}


class Client:
    def __init__(self, server: ApiServer, key: str) -> None:
        self.base = server.url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.base + path, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.session.post(self.base + path, timeout=60, **kw)

    def wait_job(self, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.get(f"/v1/jobs/{job_id}").json()
            if view["status"] in TERMINAL:
                return dict(view)
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {view['status']}")
            time.sleep(0.3)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_http_api_end_to_end(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    api_servers: Callable[..., ApiServer],
) -> None:
    celery_workers(worker_env, n=1, concurrency=8)
    server = api_servers(worker_env)
    a = Client(server, create_tenant(worker_env, "tenant-a"))
    b = Client(server, create_tenant(worker_env, "tenant-b"))

    # -- JSON, read to the end
    card = make_specimen(seed=11)
    made = a.post("/v1/jobs", json={"front": {"base64": _b64(card.image)}, "tag": "json"})
    assert made.status_code == 201, made.text
    job_id = made.json()["job_id"]
    assert made.headers["Location"] == f"/v1/jobs/{job_id}"
    done = a.wait_job(job_id)
    assert done["status"] == "succeeded", done
    assert done["result"]["id_number"] is not None
    assert a.get(f"/v1/jobs/{job_id}?history=true").json()["history"][0]["type"] == "attempt"

    # -- multipart with the portrait
    portrait_card = make_specimen(seed=12)
    made = a.post(
        "/v1/jobs",
        files={"front": ("front.jpg", portrait_card.image, "image/jpeg")},
        data={"portrait": "true", "tag": "multipart"},
    )
    assert made.status_code == 201, made.text
    portrait_job = made.json()["job_id"]
    assert a.wait_job(portrait_job)["status"] == "succeeded"
    portrait = a.get(f"/v1/jobs/{portrait_job}/portrait")
    assert portrait.status_code == 200 and portrait.headers["content-type"].startswith("image/")
    assert len(portrait.content) > 0

    # -- a batch, counted to completion
    jobs = [{"front": {"base64": _b64(make_specimen(seed=20 + i).image)}} for i in range(3)]
    made = a.post("/v1/batches", json={"name": "e2e", "jobs": jobs})
    assert made.status_code == 201, made.text
    batch_id = made.json()["batch_id"]
    assert len(made.json()["jobs"]) == 3
    deadline = time.monotonic() + 90
    while not (progress := a.get(f"/v1/batches/{batch_id}").json())["completed"]:
        assert time.monotonic() < deadline, progress
        time.sleep(0.3)
    assert progress["counts"] == {"pending": 0, "succeeded": 3, "failed": 0}

    # -- idempotency: a replay, a conflict, then 20 concurrent requests under one new key
    body = {"front": {"base64": _b64(make_specimen(seed=40).image)}, "tag": "idem"}
    first = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same"})
    again = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["job_id"] == first.json()["job_id"]
    other = a.post("/v1/jobs", json={**body, "tag": "other"}, headers={"Idempotency-Key": "same"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    racing = {"front": {"base64": _b64(make_specimen(seed=41).image)}, "tag": "race"}

    def race(_: int) -> requests.Response:
        with requests.Session() as s:
            return s.post(
                server.url + "/v1/jobs",
                json=racing,
                headers={**a.session.headers, "Idempotency-Key": "race-key"},
                timeout=60,
            )

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(race, range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 19 + [201], [r.text for r in answers if r.status_code >= 300]
    assert len({r.json()["job_id"] for r in answers}) == 1
    engine = sa.create_engine(worker_env["MACAO_OCR_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            tagged = conn.execute(
                sa.text("SELECT count(*) FROM job WHERE tag IN ('race', 'idem')")
            ).scalar()
    finally:
        engine.dispose()
    assert tagged == 2

    # -- tenant B sees none of A's
    for path in (
        f"/v1/jobs/{job_id}",
        f"/v1/batches/{batch_id}",
        f"/v1/jobs/{portrait_job}/portrait",
    ):
        answer = b.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"] == "application/problem+json"
    assert b.get("/v1/jobs").json()["jobs"] == []
    assert b.post(f"/v1/jobs/{job_id}/replay").status_code == 404

    # -- 401: no key, an unknown key, a revoked key
    assert requests.get(server.url + "/v1/jobs", timeout=10).status_code == 401
    stranger = requests.get(
        server.url + "/v1/jobs", headers={"Authorization": "Bearer mocr_x"}, timeout=10
    )
    assert stranger.status_code == 401
    keys = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "tenants", "keys",
         "tenant-b", "--json"],
        env=cli_env(worker_env), cwd=REPO_ROOT, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    key_id = json.loads(keys.stdout.splitlines()[0])["key_id"]
    subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "tenants", "revoke", key_id],
        env=cli_env(worker_env), cwd=REPO_ROOT, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    # A server process remembers a valid key for up to http_key_cache_s (5 s by default).
    deadline = time.monotonic() + Settings.model_construct().http_key_cache_s + 2
    while b.get("/v1/jobs").status_code != 401:
        assert time.monotonic() < deadline, "a revoked key still accepted"
        time.sleep(0.2)

    # -- the server stays healthy, and is ready (database, Redis, broker)
    assert requests.get(server.url + "/readyz", timeout=10).json()["status"] == "ok"
