"""Replaying dead letters on a migrated PostgreSQL with a recording publisher."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from models import Attempt, Job, JobEvent, JobStatus, Portrait, Result, Warning
from tests.fixtures.workers import sealed_job, sealed_result, sealer_for_tests
from worker.broker.publish import RecordingPublisher
from worker.cli import app as cli_app
from worker.errors import InputError
from worker.replay import FORCED_NOTE, replay
from worker.settings import Settings
from worker.sweeper import sweep_once

T0 = datetime(2030, 1, 2, 3, 0, 0, tzinfo=UTC)
OCR_FAILED = "FailedOperation.OcrFailed"


@pytest.fixture
def settings() -> Settings:
    return Settings(tenant="acme")


def add_failed(
    session: Session,
    *,
    code: str = OCR_FAILED,
    calls: int = 2,
    tenant: str = "acme",
    batch: str | None = None,
    finished_at: datetime = T0,
    status: JobStatus = JobStatus.failed,
) -> Job:
    job = sealed_job(
        front_url="https://cards.example/front.jpg",
        tenant=tenant,
        status=status,
        batch=batch,
        attempts=calls,
        api_calls=calls,
        last_error_code=code,
        last_error_message="recognition failed",
        created_at=finished_at - timedelta(minutes=5),
        started_at=finished_at - timedelta(minutes=4),
        finished_at=finished_at,
        enqueued_at=finished_at - timedelta(minutes=5),
    )
    session.add(job)
    session.flush()
    for number in range(1, calls + 1):
        session.add(
            Attempt(
                job_id=job.id,
                number=number,
                started_at=finished_at - timedelta(minutes=4 - number),
                finished_at=finished_at - timedelta(minutes=4 - number),
                outcome_code=code,
                request_id=f"req-{number}",
            )
        )
    session.flush()
    return job


def add_succeeded(session: Session) -> Job:
    job = add_failed(session, code="FailedOperation.OcrFailed", calls=2)
    job.status = JobStatus.succeeded
    session.add(sealed_result(job_id=job.id, request_id="req-ok", id_number="1234567(8)"))
    session.flush()
    session.add_all(
        [
            Warning(job_id=job.id, code=-9101, name="Card incomplete"),
            Portrait(
                job_id=job.id, data=sealer_for_tests().seal_portrait(job.id, b"\xff\xd8portrait")
            ),
        ]
    )
    session.flush()
    return job


def snapshot(session_factory: sessionmaker[Session]) -> list[tuple[object, ...]]:
    with session_factory() as session:
        jobs = session.execute(
            select(
                Job.id,
                Job.status,
                Job.attempts,
                Job.last_error_code,
                Job.finished_at,
                Job.enqueued_at,
            ).order_by(Job.id)
        ).all()
        counts = tuple(
            session.scalar(select(func.count()).select_from(model))
            for model in (Attempt, JobEvent, Result, Warning, Portrait)
        )
    return [*map(tuple, jobs), counts]


def run(
    session_factory: sessionmaker[Session],
    publisher: RecordingPublisher,
    settings: Settings,
    **kwargs: object,
) -> object:
    kwargs.setdefault("actor", "ops@box")
    kwargs.setdefault("reason", "vendor outage over")
    kwargs.setdefault("sealer", sealer_for_tests())
    return replay(session_factory, publisher, settings, **kwargs)  # type: ignore[arg-type]


def test_replay_by_error_code_resets_budget_and_keeps_history(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        target = add_failed(session, calls=3)
        other_code = add_failed(session, code="FailedOperation.ImageNoSpecifiedCard", calls=1)
    statuses_at_publish: list[JobStatus] = []

    def check(ids: Sequence[uuid.UUID]) -> None:
        with session_factory() as session:
            statuses_at_publish.extend(session.get_one(Job, i).status for i in ids)

    publisher = RecordingPublisher(on_publish=check)

    report = replay(
        session_factory,
        publisher,
        settings,
        error_code=OCR_FAILED,
        actor="ops@box",
        reason="vendor outage over",
        sealer=sealer_for_tests(),
    )

    assert report.matched == [target.id]
    assert report.replayed == [target.id]
    assert report.refused == {}
    assert publisher.published == [target.id]
    assert statuses_at_publish == [JobStatus.queued]
    with session_factory() as session:
        job = session.get_one(Job, target.id)
        assert job.status == JobStatus.queued
        assert job.attempts == 0
        assert job.api_calls == 3  # every call ever made still counts
        assert job.last_error_code is None and job.last_error_message is None
        assert job.finished_at is None and job.next_attempt_at is None
        assert job.enqueued_at is not None
        numbers = session.scalars(
            select(Attempt.number).where(Attempt.job_id == target.id).order_by(Attempt.number)
        ).all()
        assert numbers == [1, 2, 3]
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == target.id)).all()
        assert [
            (e.kind, e.actor, e.reason, e.previous_status, e.previous_error_code) for e in events
        ] == [("replay", "ops@box", "vendor outage over", "failed", OCR_FAILED)]
        untouched = session.get_one(Job, other_code.id)
        assert untouched.status == JobStatus.failed
        assert untouched.attempts == 1


def test_filters_batch_window_status_default_and_tenant(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        early = add_failed(session, batch="b1", finished_at=T0 - timedelta(hours=2))
        inside = add_failed(session, batch="b1", finished_at=T0)
        other_batch = add_failed(session, batch="b2", finished_at=T0)
        late = add_failed(session, batch="b1", finished_at=T0 + timedelta(hours=2))
        done = add_succeeded(session)
        done.batch = "b1"
        foreign = add_failed(session, batch="b1", tenant="other", finished_at=T0)
    publisher = RecordingPublisher()

    report = run(
        session_factory,
        publisher,
        settings,
        batch="b1",
        since=T0 - timedelta(hours=1),
        until=T0 + timedelta(hours=1),
        dry_run=True,
    )
    assert report.matched == [inside.id]  # type: ignore[attr-defined]

    by_batch = run(session_factory, publisher, settings, batch="b1", dry_run=True)
    # The status defaults to failed with filters: the succeeded job is not even matched.
    assert set(by_batch.matched) == {early.id, inside.id, late.id}  # type: ignore[attr-defined]

    # Another tenant's job reads as not found, even by id.
    by_id = run(session_factory, publisher, settings, job_ids=[foreign.id, other_batch.id])
    assert by_id.replayed == [other_batch.id]  # type: ignore[attr-defined]
    assert by_id.refused == {foreign.id: "not found"}  # type: ignore[attr-defined]
    with session_factory() as session:
        assert session.get_one(Job, foreign.id).status == JobStatus.failed


def test_dry_run_changes_nothing(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        jobs = [add_failed(session) for _ in range(3)]
        add_succeeded(session)
    before = snapshot(session_factory)
    publisher = RecordingPublisher()

    report = run(session_factory, publisher, settings, status="failed", dry_run=True)

    assert report.dry_run  # type: ignore[attr-defined]
    assert set(report.replayed) == {j.id for j in jobs}  # type: ignore[attr-defined]
    assert set(report.error_codes.values()) == {OCR_FAILED}  # type: ignore[attr-defined]
    assert publisher.published == []
    assert snapshot(session_factory) == before


def test_succeeded_job_refused_unless_forced(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        done = add_succeeded(session)
    publisher = RecordingPublisher()

    refused = run(session_factory, publisher, settings, job_ids=[done.id])
    assert refused.replayed == []  # type: ignore[attr-defined]
    assert "use --force" in refused.refused[done.id]  # type: ignore[attr-defined]
    with session_factory() as session:
        assert session.get(Result, done.id) is not None
        assert session.get_one(Job, done.id).status == JobStatus.succeeded

    forced = run(session_factory, publisher, settings, job_ids=[done.id], force=True)
    assert forced.replayed == [done.id]  # type: ignore[attr-defined]
    assert publisher.published == [done.id]
    with session_factory() as session:
        assert session.get(Result, done.id) is None
        assert session.get(Portrait, done.id) is None
        assert session.scalars(select(Warning).where(Warning.job_id == done.id)).all() == []
        assert session.get_one(Job, done.id).status == JobStatus.queued
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == done.id)).one()
        assert event.previous_status == "succeeded"
        assert event.reason is not None and FORCED_NOTE in event.reason
        assert (
            session.scalar(
                select(func.count()).select_from(Attempt).where(Attempt.job_id == done.id)
            )
            == 2
        )


@pytest.mark.parametrize("status", [JobStatus.queued, JobStatus.running, JobStatus.retrying])
def test_jobs_in_flight_are_refused(
    session_factory: sessionmaker[Session], settings: Settings, status: JobStatus
) -> None:
    with session_factory() as session, session.begin():
        job = add_failed(session, status=status)
    publisher = RecordingPublisher()

    report = run(session_factory, publisher, settings, job_ids=[job.id], force=True)

    assert report.refused == {job.id: f"already in flight (status {status.value})"}  # type: ignore[attr-defined]
    assert publisher.published == []
    with session_factory() as session:
        assert session.get_one(Job, job.id).status == status
        assert session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all() == []


def test_bad_selection_is_refused_with_its_rule(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        add_failed(session)
    before = snapshot(session_factory)
    publisher = RecordingPublisher()

    with pytest.raises(InputError) as nothing:
        run(session_factory, publisher, settings)
    assert nothing.value.code == "Input.replay_selection"
    with pytest.raises(InputError) as bad_status:
        run(session_factory, publisher, settings, status="dead")
    assert bad_status.value.code == "Input.replay_status"
    assert "failed" in bad_status.value.message
    with pytest.raises(InputError) as naive:
        run(session_factory, publisher, settings, since=datetime(2030, 1, 1))
    assert naive.value.code == "Input.replay_time"
    assert snapshot(session_factory) == before
    assert publisher.published == []


def test_broker_down_at_replay_leaves_jobs_for_the_sweeper(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session, session.begin():
        job = add_failed(session)
    down = RecordingPublisher(fail=True)

    report = run(session_factory, down, settings, job_ids=[job.id])

    assert report.replayed == [job.id]  # type: ignore[attr-defined]
    assert report.published is False  # type: ignore[attr-defined]
    with session_factory() as session:
        row = session.get_one(Job, job.id)
        assert (row.status, row.enqueued_at) == (JobStatus.queued, None)
    up = RecordingPublisher()
    later = T0 + timedelta(days=1)
    sweep_once(session_factory, up, settings, now=later)
    assert up.published == [job.id]


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def committed_db(
    fresh_migrated_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> sessionmaker[Session]:
    url = fresh_migrated_database()
    monkeypatch.setenv("MACAO_OCR_DATABASE_URL", url)
    monkeypatch.setenv("MACAO_OCR_TENANT", "acme")
    engine = sa.create_engine(url)
    return sessionmaker(engine, expire_on_commit=False)


def test_cli_refuses_without_selection(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as session, session.begin():
        add_failed(session)
    before = snapshot(committed_db)

    result = CliRunner().invoke(cli_app, ["replay"])

    assert result.exit_code == 2
    assert "--error-code" in result.output
    assert snapshot(committed_db) == before


def test_cli_dry_run_lists_ids_and_codes(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as session, session.begin():
        a = add_failed(session)
        b = add_failed(session, code="InternalError")
        add_failed(session, tenant="other")
    before = snapshot(committed_db)

    human = CliRunner().invoke(cli_app, ["replay", "--status", "failed", "--dry-run"])
    as_json = CliRunner().invoke(
        cli_app, ["replay", "--error-code", "InternalError", "--dry-run", "--json"]
    )

    assert human.exit_code == 0, human.output
    assert "2 matched, would replay 2" in human.output
    assert f"{a.id}  {OCR_FAILED}" in human.output
    assert f"{b.id}  InternalError" in human.output
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output)
    assert payload["dry_run"] is True
    # Nothing went to the broker (it used to say `"published": true`).
    assert payload["published"] == 0
    assert payload["publish_failed"] is False
    assert payload["replayed"] == [str(b.id)]
    assert payload["jobs"] == [{"job_id": str(b.id), "error_code": "InternalError"}]
    assert snapshot(committed_db) == before
