"""A batch's counters move with its jobs' terminal transitions, in the same transaction
(PostgreSQL's one-statement success included) and back with a replay: `GET /v1/batches/{id}`
reads one row instead of counting jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import migrations
from models import Batch, Job, JobStatus
from models.base import utcnow
from tests.fixtures.workers import sealed_job, sealer_for_tests
from tests.integration.test_job_sql import _ok_result, _record
from worker.broker.publish import RecordingPublisher
from worker.replay import replay
from worker.settings import Settings
from worker.store import job_sql


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "postgresql":
        yield request.getfixturevalue("session_factory")
        return
    url = f"sqlite:///{tmp_path / 'batch.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def _batch(sessions: sessionmaker[Session], n: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    with sessions() as session, session.begin():
        batch = Batch(id=uuid.uuid4(), tenant="t", name="b", total=n, succeeded=0, failed=0)
        session.add(batch)
        jobs = [
            sealed_job(
                id=uuid.uuid4(), tenant="t", front_url="https://x.invalid/a.png", batch_id=batch.id
            )
            for _ in range(n)
        ]
        session.add_all(jobs)
        return batch.id, [j.id for j in jobs]


def _start(sessions: sessionmaker[Session], job_id: uuid.UUID) -> None:
    now = utcnow()
    with sessions() as session, session.begin():
        claimed = job_sql.claim(
            session.connection(),
            job_id,
            now=now,
            lease_until=now + timedelta(seconds=60),
            host="h",
            open_attempt=True,
            sealer=sealer_for_tests(),
        )
        assert claimed is not None and claimed.opened


def _counts(sessions: sessionmaker[Session], batch_id: uuid.UUID) -> tuple[int, int, int]:
    with sessions() as session:
        b = session.get_one(Batch, batch_id)
        session.refresh(b)
        return b.total, b.succeeded, b.failed


def test_success_failure_and_replay_move_the_counters(sessions: sessionmaker[Session]) -> None:
    batch_id, (ok, bad, other) = _batch(sessions, 3)
    _start(sessions, ok)
    with sessions() as session, session.begin():
        job_sql.store_success(
            session.connection(), ok, 1, _record(), _ok_result(), False, sealer=sealer_for_tests()
        )
    assert _counts(sessions, batch_id) == (3, 1, 0)
    _start(sessions, bad)
    with sessions() as session, session.begin():
        job_sql.mark_failed(session.connection(), bad, utcnow(), "X.Bad", "bad")
    assert _counts(sessions, batch_id) == (3, 1, 1)
    # A job outside any batch moves nothing.
    with sessions() as session, session.begin():
        lone = sealed_job(id=uuid.uuid4(), tenant="t", front_url="https://x.invalid/c.png")
        session.add(lone)
    _start(sessions, lone.id)
    with sessions() as session, session.begin():
        job_sql.mark_failed(session.connection(), lone.id, utcnow(), "X.Bad", "bad")
    assert _counts(sessions, batch_id) == (3, 1, 1)
    report = replay(
        sessions,
        RecordingPublisher(),
        Settings(tenant="t"),
        job_ids=[bad],
        actor="test",
        reason=None,
        sealer=sealer_for_tests(),
    )
    assert report.replayed == [bad]
    assert _counts(sessions, batch_id) == (3, 1, 0)
    with sessions() as session:
        assert session.get_one(Job, other).status is JobStatus.queued


def test_a_failed_success_statement_moves_nothing(sessions: sessionmaker[Session]) -> None:
    batch_id, (job_id,) = _batch(sessions, 1)
    _start(sessions, job_id)
    with sessions() as session, session.begin():
        job_sql.store_success(
            session.connection(),
            job_id,
            1,
            _record(),
            _ok_result(),
            False,
            sealer=sealer_for_tests(),
        )
    # A second result is refused, and the counter of the statement that raised is not kept.
    with pytest.raises(sa.exc.IntegrityError), sessions() as session, session.begin():
        job_sql.store_success(
            session.connection(),
            job_id,
            1,
            _record(),
            _ok_result(),
            False,
            sealer=sealer_for_tests(),
        )
    assert _counts(sessions, batch_id) == (1, 1, 0)
