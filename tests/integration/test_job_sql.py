"""The worker's one-round-trip claim and one-statement success, on PostgreSQL and on SQLite
(the demo's database).

Its RETURNING clause reads the attempts, the result and the image bytes through correlated
subqueries; SQLite's compiler renders those columns without their table, which once made a
subquery compare `attempt.id` where it meant `job.id`. Each case has two attempts or two
images, so a wrong correlation changes the answer."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import migrations
from models import Attempt, Job, JobStatus, Result, Warning
from models.base import utcnow
from tests.fixtures.workers import sealed_job, sealer_for_tests
from worker.store import job_sql
from worker.store.images import store_image
from worker.tencent.types import CardWarning, OcrResult

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
        job = sealed_job(**values)
        session.add(job)
        session.flush()
        return job.id


def _claim(
    sessions: sessionmaker[Session], job_id: uuid.UUID, *, open_attempt: bool = False
) -> job_sql.Claimed | None:
    now = utcnow()
    with sessions() as session, session.begin():
        return job_sql.claim(
            session.connection(),
            job_id,
            now=now,
            lease_until=now + timedelta(seconds=60),
            host="h1",
            open_attempt=open_attempt,
            sealer=sealer_for_tests(),
        )


def test_claim_returns_both_images_and_counts_the_call(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        front, back = (
            store_image(session, sealer_for_tests(), "t", PNG),
            store_image(session, sealer_for_tests(), "t", JPEG),
        )
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


def _ok_result(**values: object) -> OcrResult:
    fields: dict[str, object] = {f.name: None for f in dataclasses.fields(OcrResult)}
    fields.update(request_id="r-1", warnings=(), portrait=None, warning_service_disabled=False)
    fields.update(values)
    return OcrResult(**fields)  # type: ignore[arg-type]


def _record(code: str = "OK") -> job_sql.CallRecord:
    now = utcnow()
    return job_sql.CallRecord(
        started_at=now - timedelta(seconds=1),
        finished_at=now,
        code=code,
        message=None,
        request_id="r-1",
        latency_ms=321,
    )


@pytest.mark.parametrize(
    "warnings", [(), (CardWarning(-9102, "photocopy"), CardWarning(-9107, "glare"))]
)
def test_store_success_writes_result_warnings_attempt_and_job_together(
    sessions: sessionmaker[Session], warnings: tuple[CardWarning, ...]
) -> None:
    job_id = _add(sessions, front_url="https://x.invalid/a.png")
    other = _add(sessions, front_url="https://x.invalid/b.png")
    for jid in (job_id, other):
        assert _claim(sessions, jid) is not None
        with sessions() as session, session.begin():
            job_sql.insert_attempt(session.connection(), jid, 1, now=utcnow(), host="h1")
    result = _ok_result(en_last_name="CHAN", id_number="1234567(8)", warnings=warnings)
    with sessions() as session, session.begin():
        job_sql.store_success(
            session.connection(), job_id, 1, _record(), result, False, sealer=sealer_for_tests()
        )
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.attempts, job.lease_expires_at) == (JobStatus.succeeded, 1, None)
        stored = sealer_for_tests().open_result(session.get_one(Result, job_id))
        assert (stored.en_last_name, stored.id_number) == ("CHAN", "1234567(8)")
        rows = session.scalars(sa.select(Warning).where(Warning.job_id == job_id)).all()
        assert sorted((w.code, w.name) for w in rows) == sorted((w.code, w.name) for w in warnings)
        [attempt] = session.scalars(sa.select(Attempt).where(Attempt.job_id == job_id)).all()
        assert (attempt.outcome_code, attempt.latency_ms) == ("OK", 321)
        assert attempt.finished_at is not None
        # The other job, with its own open attempt, is untouched.
        assert session.get_one(Job, other).status is JobStatus.running
        [open_attempt] = session.scalars(sa.select(Attempt).where(Attempt.job_id == other)).all()
        assert open_attempt.finished_at is None


def test_store_success_twice_raises_and_changes_nothing(sessions: sessionmaker[Session]) -> None:
    job_id = _add(sessions, front_url="https://x.invalid/a.png")
    assert _claim(sessions, job_id) is not None
    with sessions() as session, session.begin():
        job_sql.insert_attempt(session.connection(), job_id, 1, now=utcnow(), host="h1")
        session.add(Result(job_id=job_id, request_id="first"))
    with pytest.raises(sa.exc.IntegrityError), sessions() as session, session.begin():
        warned = _ok_result(warnings=(CardWarning(-9102, "photocopy"),))
        job_sql.store_success(
            session.connection(), job_id, 1, _record(), warned, False, sealer=sealer_for_tests()
        )
    with sessions() as session:
        assert session.get_one(Result, job_id).request_id == "first"
        assert session.get_one(Job, job_id).status is JobStatus.running
        assert session.scalars(sa.select(Warning).where(Warning.job_id == job_id)).all() == []
        [attempt] = session.scalars(sa.select(Attempt).where(Attempt.job_id == job_id)).all()
        assert attempt.finished_at is None


def _numbers(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[tuple[int, bool]]:
    with sessions() as session:
        rows = session.scalars(
            sa.select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
        ).all()
        return [(a.number, a.finished_at is None) for a in rows]


def test_claim_opens_the_first_attempt_of_a_plain_start(sessions: sessionmaker[Session]) -> None:
    job_id = _add(sessions, front_url="https://x.invalid/a.png")
    other = _add(sessions, front_url="https://x.invalid/b.png")
    claimed = _claim(sessions, job_id, open_attempt=True)
    assert claimed is not None and claimed.opened and claimed.last_number == 0
    assert _numbers(sessions, job_id) == [(1, True)]
    assert _numbers(sessions, other) == []
    with sessions() as session:
        assert session.get_one(Job, job_id).api_calls == 1


def test_claim_opens_nothing_past_a_lost_attempt_or_a_stored_result(
    sessions: sessionmaker[Session],
) -> None:
    past = utcnow() - timedelta(minutes=5)
    lost = _add(
        sessions,
        front_url="https://x.invalid/a.png",
        status=JobStatus.running,
        lease_expires_at=past,
        started_at=past,
    )
    bought = _add(sessions, front_url="https://x.invalid/b.png")
    with sessions() as session, session.begin():
        session.add(Attempt(job_id=lost, number=1, started_at=past))
        session.add(Result(job_id=bought, request_id="r"))
    claimed = _claim(sessions, lost, open_attempt=True)
    # The lost attempt is the caller's to close first (it spends budget); nothing opened.
    assert claimed is not None and not claimed.opened and claimed.open_attempts == 1
    assert _numbers(sessions, lost) == [(1, True)]
    claimed = _claim(sessions, bought, open_attempt=True)
    assert claimed is not None and not claimed.opened and claimed.bought
    assert _numbers(sessions, bought) == []
