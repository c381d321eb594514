"""The worker's one-round-trip claim, on PostgreSQL and on SQLite (the demo's database).

Its RETURNING clause reads the attempts, the result and the image bytes through correlated
subqueries; SQLite's compiler renders those columns without their table, which once made a
subquery compare `attempt.id` where it meant `job.id`. Each case has two attempts or two
images, so a wrong correlation changes the answer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import migrations
from models import Attempt, Job, JobStatus, Result
from models.base import utcnow
from worker import job_sql
from worker.images import store_image

PNG = b"\x89PNG\r\n\x1a\n" + b"front" * 10
JPEG = b"\xff\xd8\xff" + b"back" * 10


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "postgresql":
        yield request.getfixturevalue("session_factory")
        return
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def _add(sessions: sessionmaker[Session], **values: object) -> uuid.UUID:
    with sessions() as session, session.begin():
        job = Job(**values)
        session.add(job)
        session.flush()
        return job.id


def _claim(sessions: sessionmaker[Session], job_id: uuid.UUID) -> job_sql.Claimed | None:
    now = utcnow()
    with sessions() as session, session.begin():
        return job_sql.claim(
            session.connection(),
            job_id,
            now=now,
            lease_until=now + timedelta(seconds=60),
            host="h1",
        )


def test_claim_returns_both_images_and_counts_the_call(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        front, back = store_image(session, "t", PNG), store_image(session, "t", JPEG)
        session.flush()
        ids = front.id, back.id
    job_id = _add(sessions, tenant="t", front_image_id=ids[0], back_image_id=ids[1])
    claimed = _claim(sessions, job_id)
    assert claimed is not None
    assert (claimed.front_data, claimed.back_data) == (PNG, JPEG)
    assert (claimed.front_image_id, claimed.back_image_id) == ids
    assert (claimed.open_attempts, claimed.last_number, claimed.bought) == (0, 0, False)
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.api_calls, job.worker_host) == (JobStatus.running, 1, "h1")
        assert job.started_at is not None and job.lease_expires_at is not None


def test_claim_of_an_expired_lease_sees_the_open_attempt(sessions: sessionmaker[Session]) -> None:
    past = utcnow() - timedelta(minutes=5)
    job_id = _add(
        sessions,
        front_url="https://x.invalid/a.png",
        status=JobStatus.running,
        lease_expires_at=past,
        started_at=past,
        attempts=1,
    )
    with sessions() as session, session.begin():
        session.add(Attempt(job_id=job_id, number=1, started_at=past, finished_at=past))
        session.add(Attempt(job_id=job_id, number=2, started_at=past))
    claimed = _claim(sessions, job_id)
    assert claimed is not None
    assert (claimed.open_attempts, claimed.last_number, claimed.bought) == (1, 2, False)
    assert claimed.front_url == "https://x.invalid/a.png" and claimed.front_data is None
    with sessions() as session, session.begin():
        assert job_sql.close_lost_attempts(session.connection(), job_id, utcnow()) == 1
    with sessions() as session:
        assert session.get_one(Job, job_id).attempts == 2
        codes = session.scalars(
            sa.select(Attempt.outcome_code).where(Attempt.job_id == job_id).order_by(Attempt.number)
        ).all()
        assert codes == [None, "WorkerLost"]


def test_claim_sees_a_stored_result(sessions: sessionmaker[Session]) -> None:
    job_id = _add(sessions, front_url="https://x.invalid/a.png")
    other = _add(sessions, front_url="https://x.invalid/b.png")
    with sessions() as session, session.begin():
        session.add(Result(job_id=other, request_id="r-other"))
    claimed = _claim(sessions, job_id)
    assert claimed is not None and claimed.bought is False
    with sessions() as session, session.begin():
        session.add(Result(job_id=job_id, request_id="r"))
        session.get_one(Job, job_id).status = JobStatus.queued
    claimed = _claim(sessions, job_id)
    assert claimed is not None and claimed.bought is True


def test_claim_leaves_a_job_that_is_not_due(sessions: sessionmaker[Session]) -> None:
    later = utcnow() + timedelta(minutes=5)
    retrying = _add(
        sessions,
        front_url="https://x.invalid/a.png",
        status=JobStatus.retrying,
        next_attempt_at=later,
    )
    running = _add(
        sessions,
        front_url="https://x.invalid/a.png",
        status=JobStatus.running,
        lease_expires_at=later,
    )
    assert _claim(sessions, retrying) is None
    assert _claim(sessions, running) is None
    with sessions() as session:
        assert session.get_one(Job, retrying).api_calls == 0
        assert session.get_one(Job, running).status is JobStatus.running
