"""`Idempotency-Key` under real concurrency on PostgreSQL: one key makes exactly one job (or
batch) when requests race, when the first one is slow enough to be taken over, and when a
server dies after claiming the key. In process (FastAPI's TestClient, requests from real
threads) over a real migrated database; the end-to-end test runs 20 concurrent requests
against a real server too."""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from models import Batch, IdempotencyKey, Job
from models.base import utcnow
from worker.broker.publish import RecordingPublisher
from worker.http import idempotency, routes_jobs
from worker.http.app import create_app
from worker.http.grouped import PendingJob
from worker.http.intake import (
    RequestDigest,
    request_digest,
    request_sha256,
    spec_digest,
    spec_from_json,
)
from worker.http.problems import ProblemError
from worker.http.schemas import JobRequest
from worker.http.services import Services
from worker.settings import Settings
from worker.tenants import Caller, create_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

URL_JOB = {"front": {"url": "https://cards.example/front.jpg"}}
STALE_AFTER = timedelta(milliseconds=300)


@pytest.fixture
def client(fresh_migrated_database: Callable[[], str]) -> Iterator[TestClient]:
    app = create_app(
        Settings(database_url=fresh_migrated_database(), qps=0), publisher=RecordingPublisher()
    )
    with TestClient(app) as test_client:
        yield test_client


def services(client: TestClient) -> Services:
    found: Services = client.app.state.services  # type: ignore[attr-defined]
    return found


def headers(client: TestClient, tenant: str, key: str) -> dict[str, str]:
    made = create_key(services(client).session_factory, tenant)
    return {"Authorization": f"Bearer {made.api_key}", "Idempotency-Key": key}


def count(client: TestClient, model: Any) -> int:
    with services(client).session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_concurrent_requests_with_one_key_make_one_job(client: TestClient) -> None:
    h = headers(client, "acme", "same")
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda _: client.post("/v1/jobs", json=URL_JOB, headers=h), range(24))
        )
    assert sorted({a.status_code for a in answers}) in ([200, 201], [201])
    assert [a.status_code for a in answers].count(201) == 1
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert count(client, Job) == 1


def test_a_slow_first_request_taken_over_stores_nothing_and_answers_the_takers_job(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request claims the key, then stalls past ABANDONED_AFTER before storing its
    job. A retry takes the claim over and makes the job. When the first wakes, its seal
    finds the claim gone: its job is rolled back and it answers the retry's job."""
    monkeypatch.setattr(idempotency, "ABANDONED_AFTER", STALE_AFTER)
    groups = services(client).groups
    real_store = groups.store
    first_in, retry_done = threading.Event(), threading.Event()
    calls: list[int] = []

    def store(job: PendingJob) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            first_in.set()
            assert retry_done.wait(30)
        return real_store(job)

    monkeypatch.setattr(groups, "store", store)
    h = headers(client, "acme", "slow")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/jobs", json=URL_JOB, headers=h)
        assert first_in.wait(30)
        retry = client.post("/v1/jobs", json=URL_JOB, headers=h)
        retry_done.set()
        slow = first.result(60)
    assert retry.status_code == 201, retry.text
    assert slow.status_code == 200, slow.text
    assert slow.headers["Idempotent-Replayed"] == "true"
    assert slow.json()["job_id"] == retry.json()["job_id"]
    assert len(calls) == 2  # the first (its insert rolled back by its lost seal), the retry
    assert count(client, Job) == 1


def test_a_batch_taken_over_is_made_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency, "ABANDONED_AFTER", STALE_AFTER)
    real_admit = services(client).backlog.admit
    first_in, retry_done = threading.Event(), threading.Event()
    calls: list[int] = []

    def admit(tenant: str, jobs: int) -> None:
        calls.append(1)
        if len(calls) == 1:
            first_in.set()
            assert retry_done.wait(30)
        real_admit(tenant, jobs)

    monkeypatch.setattr(services(client).backlog, "admit", admit)
    h = headers(client, "acme", "batch")
    body = {"name": "n", "jobs": [URL_JOB] * 3}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/batches", json=body, headers=h)
        assert first_in.wait(30)
        retry = client.post("/v1/batches", json=body, headers=h)
        retry_done.set()
        slow = first.result(60)
    assert retry.status_code == 201 and slow.status_code == 200, (retry.text, slow.text)
    assert slow.json() == retry.json()
    assert count(client, Batch) == 1 and count(client, Job) == 3


def test_a_seal_in_progress_wins_over_a_take_over(client: TestClient) -> None:
    """The take-over's UPDATE waits for the row lock of a seal not yet committed, then finds
    the row sealed and takes nothing: the slow request that sealed first keeps its job."""
    sessions = services(client).sessions("acme")
    owner = idempotency.begin(sessions, "acme", "k", "d", job_id=uuid.uuid4())
    assert isinstance(owner, idempotency.Claim)
    with services(client).session_factory() as session, session.begin():
        # Stale already: another request may take it over.
        session.execute(
            sa.update(IdempotencyKey).values(created_at=utcnow() - timedelta(minutes=5))
        )
    sealing = sessions()
    sealing.begin()
    idempotency.seal(sealing, owner)  # the row is locked until this transaction ends
    outcome: list[idempotency.Done | idempotency.Claim] = []
    taker = threading.Thread(
        target=lambda: outcome.append(
            idempotency.begin(sessions, "acme", "k", "d", job_id=uuid.uuid4())
        )
    )
    taker.start()
    taker.join(1.0)
    assert taker.is_alive()  # waiting for the seal's lock
    sealing.commit()
    sealing.close()
    taker.join(30)
    [done] = outcome
    assert isinstance(done, idempotency.Done) and done.job_id == owner.job_id


def test_a_claim_left_by_a_dead_server_is_taken_over_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server claimed the key and died before storing anything. Once the claim is stale,
    concurrent retries make exactly one job between them."""
    monkeypatch.setattr(idempotency, "ABANDONED_AFTER", STALE_AFTER)
    h = headers(client, "acme", "orphan")
    sessions = services(client).sessions("acme")
    digest = idempotency_digest(client, h)
    dead = idempotency.begin(sessions, "acme", "orphan", digest, job_id=uuid.uuid4())
    assert isinstance(dead, idempotency.Claim)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: client.post("/v1/jobs", json=URL_JOB, headers=h), range(8))
        )
    assert [a.status_code for a in answers].count(201) == 1, [a.text for a in answers]
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert answers[0].json()["job_id"] != str(dead.job_id)
    assert count(client, Job) == 1


def test_a_server_dying_after_its_commit_leaves_the_key_answered(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job and the key's seal commit together: a crash right after (here, before the
    publish returns) leaves the key answered by that job, never free for a second one."""
    h = headers(client, "acme", "crash")
    publisher = services(client).publisher
    assert isinstance(publisher, RecordingPublisher)

    class Crash(BaseException):
        pass

    def crash(_ids: Any) -> None:
        raise Crash

    monkeypatch.setattr(publisher, "publish", crash)
    # Called as the route calls it (a BaseException would stop the TestClient's loop).
    spec = spec_from_json(JobRequest.model_validate(URL_JOB))
    with pytest.raises(Crash):
        routes_jobs._create(services(client), Caller("acme", "key_x"), spec, None, "crash")
    monkeypatch.undo()
    again = client.post("/v1/jobs", json=URL_JOB, headers=h)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert count(client, Job) == 1


def idempotency_digest(client: TestClient, h: dict[str, str]) -> RequestDigest:
    """The digest the API binds URL_JOB to (as `_create` computes it)."""
    spec = spec_from_json(JobRequest.model_validate(URL_JOB))
    return request_digest(services(client).sealer, "job", spec_digest(spec, None))


def test_the_key_is_bound_to_a_keyed_digest_and_old_unkeyed_ones_still_answer(
    client: TestClient,
) -> None:
    """No plain hash of a request (whose image digests would confirm a known card) is stored:
    `<data key id>:<HMAC>`. A key stored by a release before (an unkeyed SHA-256) still
    answers the same request and refuses another."""
    h = headers(client, "acme", "keyed")
    first = client.post("/v1/jobs", json=URL_JOB, headers=h)
    assert first.status_code == 201
    job_id = uuid.UUID(first.json()["job_id"])
    spec = spec_from_json(JobRequest.model_validate(URL_JOB))
    plain = request_sha256("job", spec_digest(spec, None))
    with services(client).session_factory() as session, session.begin():
        stored = session.get(IdempotencyKey, ("acme", "keyed"))
        assert stored is not None
        assert stored.request_sha256.startswith(services(client).sealer.ring.current_id + ":")
        assert plain not in stored.request_sha256 and len(stored.request_sha256) <= 64
        session.add(
            IdempotencyKey(
                tenant="acme",
                key="legacy",
                request_sha256=plain,
                job_id=job_id,
                created_at=utcnow(),
                completed_at=utcnow(),
            )
        )
    sessions = services(client).sessions("acme")
    digest = idempotency_digest(client, h)
    again = idempotency.begin(sessions, "acme", "legacy", digest, job_id=uuid.uuid4())
    assert isinstance(again, idempotency.Done) and again.job_id == job_id
    other = spec_from_json(JobRequest.model_validate({**URL_JOB, "tag": "other"}))
    with pytest.raises(ProblemError) as refused:
        idempotency.begin(
            sessions,
            "acme",
            "legacy",
            request_digest(services(client).sealer, "job", spec_digest(other, None)),
            job_id=uuid.uuid4(),
        )
    assert refused.value.status == 409
