"""Concurrent `POST /v1/jobs` stored in one transaction (worker.http.grouped), on PostgreSQL:
a group holds many requests' jobs, an idempotency key taken over inside a group leaves the
others stored, a job that fails to store fails its own request only, and nothing is
published before its commit.

Groups are made deterministic by holding the first group's transaction open until the
other requests have all handed their jobs in: they then form the next group together."""

from __future__ import annotations

import base64
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from emulator.specimen import make_specimen
from models import IdempotencyKey, Image, Job
from worker import producer
from worker.broker.publish import RecordingPublisher
from worker.http import idempotency
from worker.http.app import create_app
from worker.http.grouped import JobGroups, PendingJob
from worker.http.services import Services
from worker.settings import Settings
from worker.tenants import create_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CARD = base64.b64encode(make_specimen(seed=4242).image).decode()


def url_job(tag: str) -> dict[str, Any]:
    return {"front": {"url": "https://cards.example/front.jpg"}, "tag": tag}


def card_job(tag: str) -> dict[str, Any]:
    return {"front": {"base64": CARD}, "tag": tag}


class Held:
    """Holds the first group's transaction until `release`; records every group's size."""

    def __init__(self, groups: JobGroups) -> None:
        self.groups = groups
        self.sizes: list[int] = []
        self.first_in = threading.Event()
        self.release = threading.Event()
        self._real = groups._store

    def __call__(self, tenant: str, group: list[PendingJob]) -> None:
        self.sizes.append(len(group))
        if len(self.sizes) == 1:
            self.first_in.set()
            assert self.release.wait(30)
        self._real(tenant, group)

    def pending(self) -> int:
        with self.groups._combiner._cond:
            return len(self.groups._combiner._pending)

    def wait_pending(self, jobs: int) -> None:
        deadline = time.monotonic() + 30
        while self.pending() < jobs:
            assert time.monotonic() < deadline, f"{self.pending()} of {jobs} jobs handed in"
            time.sleep(0.01)


@pytest.fixture
def client(fresh_migrated_database: Callable[[], str]) -> Iterator[TestClient]:
    app = create_app(
        Settings(database_url=fresh_migrated_database(), qps=0), publisher=RecordingPublisher()
    )
    # A request whose job fails to store answers 500 rather than raising in the test.
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def services(client: TestClient) -> Services:
    found: Services = client.app.state.services  # type: ignore[attr-defined]
    return found


def committed_check(svc: Services, seen: list[uuid.UUID]) -> Callable[[Sequence[uuid.UUID]], None]:
    """A publisher hook: every id published is a committed job (seen from another session)."""

    def check(ids: Sequence[uuid.UUID]) -> None:
        with svc.session_factory() as session:
            stored = set(session.scalars(select(Job.id).where(Job.id.in_(list(ids)))))
        assert stored == set(ids), "a job published before its commit"
        seen.extend(ids)

    return check


def held(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Held:
    groups = services(client).groups
    hold = Held(groups)
    monkeypatch.setattr(groups, "_store", hold)
    return hold


def count(session: Session, model: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def post(
    pool: ThreadPoolExecutor, client: TestClient, body: dict[str, Any], h: dict[str, str]
) -> Future[Any]:
    return pool.submit(client.post, "/v1/jobs", json=body, headers=h)


def test_concurrent_jobs_share_a_transaction_and_a_lost_key_leaves_the_others(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One group: card jobs (one image row between them), URL jobs, one key claimed twice
    (the first claim taken over while both wait in the group). The lost claim's job alone
    is left out; its request answers the taker's job."""
    svc = services(client)
    monkeypatch.setattr(idempotency, "ABANDONED_AFTER", timedelta(milliseconds=300))
    published: list[uuid.UUID] = []
    publisher = svc.publisher
    assert isinstance(publisher, RecordingPublisher)
    publisher.on_publish = committed_check(svc, published)
    hold = held(client, monkeypatch)
    auth = {"Authorization": f"Bearer {create_key(svc.session_factory, 'acme').api_key}"}
    keyed = {**auth, "Idempotency-Key": "k1"}
    with ThreadPoolExecutor(16) as pool:
        gate = post(pool, client, url_job("gate"), auth)
        assert hold.first_in.wait(30)
        plain = [post(pool, client, card_job(f"card-{i}"), auth) for i in range(4)]
        plain += [post(pool, client, url_job(f"url-{i}"), auth) for i in range(4)]
        hold.wait_pending(8)
        first = post(pool, client, url_job("keyed"), keyed)
        hold.wait_pending(9)
        time.sleep(0.4)  # the first claim is stale: the retry takes it over
        retry = post(pool, client, url_job("keyed"), keyed)
        hold.wait_pending(10)
        hold.release.set()
        answers = [f.result(60) for f in [gate, *plain]]
        lost, taker = first.result(60), retry.result(60)
    assert [a.status_code for a in answers] == [201] * 9, [a.text for a in answers]
    assert taker.status_code == 201, taker.text
    assert lost.status_code == 200 and lost.headers["Idempotent-Replayed"] == "true"
    assert lost.json()["job_id"] == taker.json()["job_id"]
    # The gate alone, then all ten in one transaction (no fallback to one at a time).
    assert hold.sizes == [1, 10]
    with svc.session_factory() as session:
        assert count(session, Job) == 10
        assert count(session, Image) == 1
        key = session.get(IdempotencyKey, ("acme", "k1"))
        assert key is not None and key.completed_at is not None
        assert str(key.job_id) == taker.json()["job_id"]
    expected = {a.json()["job_id"] for a in [*answers, taker]}
    assert {str(i) for i in published} == expected
    assert all(a.json()["enqueued_at"] is not None for a in [*answers, taker])


def test_a_job_that_fails_to_store_fails_only_its_own_request(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row the database refuses (here: written for another tenant, which the tenant wall
    forbids) rolls its group back; the group's jobs are stored again one transaction each,
    and only that request fails. Nothing of it is stored or published."""
    svc = services(client)
    published: list[uuid.UUID] = []
    publisher = svc.publisher
    assert isinstance(publisher, RecordingPublisher)
    publisher.on_publish = committed_check(svc, published)
    real_row = producer.job_row

    def job_row(*args: Any) -> dict[str, Any]:
        row = real_row(*args)
        if row["tag"] == "poison":
            row["tenant"] = "someone-else"
        return row

    monkeypatch.setattr("worker.http.grouped.job_row", job_row)
    hold = held(client, monkeypatch)
    auth = {"Authorization": f"Bearer {create_key(svc.session_factory, 'acme').api_key}"}
    keyed = {**auth, "Idempotency-Key": "k2"}
    with ThreadPoolExecutor(16) as pool:
        gate = post(pool, client, url_job("gate"), auth)
        assert hold.first_in.wait(30)
        good = [post(pool, client, card_job(f"card-{i}"), auth) for i in range(3)]
        good.append(post(pool, client, url_job("keyed"), keyed))
        hold.wait_pending(4)
        bad = post(pool, client, url_job("poison"), auth)
        hold.wait_pending(5)
        hold.release.set()
        answers = [f.result(60) for f in [gate, *good]]
        refused = bad.result(60)
    assert [a.status_code for a in answers] == [201] * 5, [a.text for a in answers]
    assert refused.status_code == 500
    # The gate, the group of five (rolled back), then each of the five alone.
    assert hold.sizes == [1, 5, 1, 1, 1, 1, 1]
    with svc.session_factory() as session:
        tags = set(session.scalars(select(Job.tag)))
        assert tags == {"gate", "card-0", "card-1", "card-2", "keyed"}
        assert count(session, Image) == 1
        key = session.get(IdempotencyKey, ("acme", "k2"))
        assert key is not None and key.completed_at is not None
    assert {str(i) for i in published} == {a.json()["job_id"] for a in answers}
    # The key's request is answered again with its job.
    again = client.post("/v1/jobs", json=url_job("keyed"), headers=keyed)
    assert again.status_code == 200 and again.json()["job_id"] == answers[-1].json()["job_id"]
