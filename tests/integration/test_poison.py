# ruff: noqa: F811  (the harness fixtures are imported from test_pipeline)
"""Poison jobs: a failure after the API answered never buys the job again, the answer is kept
and a replay stores it without a call; a job that keeps losing its worker fails.

Store failures here are honest ones: a CHECK constraint added in the test's own transaction
(rolled back after the test) refuses what the API returned, as the old VARCHAR(32) refused a
long ID number; removing it is "the fix". A decode failure is what the client raises when it
cannot parse a success answer.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import Attempt, Job, JobEvent, JobStatus, KeptAnswer, Result
from models.base import utcnow
from tests.fixtures.workers import sealed_job, sealer_for_tests
from tests.integration.test_pipeline import (  # noqa: F401  (fixtures)
    Harness,
    harness,
    loop_thread,
    settings,
)
from worker.broker.publish import RecordingPublisher
from worker.errors import AnswerUndecodable, StoreFailed, WorkerLostError
from worker.pipeline import Outcome
from worker.replay import replay
from worker.settings import Settings
from worker.sweeper import WORKER_LOST, sweep_once
from worker.tencent.response import parse_response

LONG_ID = "1234567(8)" * 4  # 40 characters: over the old VARCHAR(32)

ANSWER: dict[str, Any] = {
    "CnLastName": "陳",
    "EnLastName": "CHAN",
    "LastNameCode": "7115",
    "CnFirstName": "大文",
    "EnFirstName": "TAI MAN",
    "FirstNameCode": "1129 2429",
    "ID": LONG_ID,
    "Birthday": "05-03-1990",
    "Sex": "M",
    "FirstIssueDate": "01-02-2008",
    "CurrentIssueDate": "15-06-2020",
    "ValidityPeriod": "15-06-2030",
    "Symbol": "ASM",
    "Height": "1.72",
    "RetImage": "",
    "Angle": None,
    "ResidentType": "Permanent Resident Identity Card",
    "WarnCardInfos": [-9102],
    "RequestId": "req-poison",
}

# The ID number is sealed (34 bytes of envelope around it): 40 characters are over 66 bytes.
ID_LIMIT = (
    "ALTER TABLE result ADD CONSTRAINT ck_test_id_limit CHECK (octet_length(id_number) <= 66)"
)


def _kept(sessions: sessionmaker[Session], job_id: uuid.UUID) -> KeptAnswer | None:
    with sessions() as session:
        row = session.get(KeptAnswer, job_id)
        if row is not None:
            session.expunge(row)
        return row


def _replay(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Any:
    publisher = RecordingPublisher()
    report = replay(
        sessions,
        publisher,
        Settings(),
        job_ids=[job_id],
        actor="test",
        reason="fixed",
        sealer=sealer_for_tests(),
    )
    return report, publisher


def test_store_failure_fails_once_keeps_the_answer_and_replay_stores_it(
    harness: Harness, db_connection: sa.Connection
) -> None:
    db_connection.execute(sa.text(ID_LIMIT))
    harness.client.script = [parse_response(ANSWER)]
    job_id = harness.add_job()

    assert harness.run(job_id) is Outcome.failed
    job = harness.job(job_id)
    assert job.status is JobStatus.failed
    assert job.last_error_code == StoreFailed.CODE == "Internal.StoreFailed"
    assert job.last_error_message is not None and "IntegrityError" in job.last_error_message
    assert LONG_ID not in job.last_error_message
    assert job.lease_expires_at is None and job.finished_at is not None
    [attempt] = harness.attempts(job_id)
    assert attempt.outcome_code == "OK" and attempt.request_id == "req-poison"
    assert attempt.finished_at is not None
    kept = _kept(harness.sessions, job_id)
    assert kept is not None and kept.stage == "store" and kept.reason == "IntegrityError"
    assert kept.attempt_number == 1 and kept.request_id == "req-poison"
    assert json.loads(sealer_for_tests().open_answer(job_id, kept.response_json)) == ANSWER

    # Another message (a duplicate, the sweeper) buys nothing: the job is finished.
    assert harness.run(job_id) is Outcome.not_claimed
    assert len(harness.client.calls) == 1

    # Not fixed yet: the replay refuses, nothing changes, the answer stays kept.
    report, publisher = _replay(harness.sessions, job_id)
    assert report.stored == [] and "IntegrityError" in report.refused[job_id]
    assert harness.job(job_id).status is JobStatus.failed
    assert _kept(harness.sessions, job_id) is not None

    db_connection.execute(sa.text("ALTER TABLE result DROP CONSTRAINT ck_test_id_limit"))
    report, publisher = _replay(harness.sessions, job_id)
    assert report.stored == [job_id] and report.replayed == [job_id]
    assert publisher.published == []  # stored here: no message, no call
    assert len(harness.client.calls) == 1
    job = harness.job(job_id)
    assert job.status is JobStatus.succeeded
    assert job.attempts == 1 and job.api_calls == 1
    assert job.last_error_code is None
    assert job.finished_at is not None and job.finished_at > attempt.finished_at
    with harness.sessions() as session:
        result = session.get(Result, job_id)
        assert result is not None
        assert sealer_for_tests().open_result(result).id_number == LONG_ID
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(e.kind, e.previous_error_code) for e in events] == [
            ("replay", "Internal.StoreFailed")
        ]
        assert events[0].reason is not None and "kept answer" in events[0].reason
    assert _kept(harness.sessions, job_id) is None


def test_an_answer_the_client_cannot_decode_is_kept_not_retried(harness: Harness) -> None:
    answer = {**ANSWER, "ID": "1234567(8)"}

    def undecodable() -> None:
        raise AnswerUndecodable("OverflowError", answer)

    harness.client.during_call = undecodable
    job_id = harness.add_job()

    assert harness.run(job_id) is Outcome.failed
    job = harness.job(job_id)
    assert job.last_error_code == "Internal.StoreFailed"
    assert (
        job.last_error_message is not None and "decoded (OverflowError)" in job.last_error_message
    )
    kept = _kept(harness.sessions, job_id)
    assert kept is not None and kept.stage == "decode" and kept.reason == "OverflowError"
    assert [a.outcome_code for a in harness.attempts(job_id)] == ["OK"]
    assert len(harness.client.calls) == 1

    # The parser bug is "fixed" (this answer parses): the replay stores it without a call.
    report, _ = _replay(harness.sessions, job_id)
    assert report.stored == [job_id]
    assert harness.job(job_id).status is JobStatus.succeeded
    assert len(harness.client.calls) == 1


def test_an_answer_that_cannot_even_be_kept_still_fails_the_job_once(
    harness: Harness, db_connection: sa.Connection
) -> None:
    db_connection.execute(sa.text(ID_LIMIT))
    db_connection.execute(
        sa.text("ALTER TABLE kept_answer ADD CONSTRAINT ck_test_refuse CHECK (false)")
    )
    harness.client.script = [parse_response(ANSWER)]
    job_id = harness.add_job()

    assert harness.run(job_id) is Outcome.failed
    job = harness.job(job_id)
    assert job.status is JobStatus.failed and job.last_error_code == "Internal.StoreFailed"
    assert job.last_error_message is not None and "nor kept" in job.last_error_message
    assert _kept(harness.sessions, job_id) is None
    assert harness.run(job_id) is Outcome.not_claimed
    assert len(harness.client.calls) == 1


# -- a job that keeps losing its worker


def _lost_job(sessions: sessionmaker[Session], lost_before: int, *, old_round: int = 0) -> Any:
    now = utcnow()
    started = now - timedelta(seconds=300)
    with sessions() as session, session.begin():
        job = sealed_job(
            front_url="https://cards.example/front.jpg",
            status=JobStatus.running,
            started_at=started,
            lease_expires_at=now - timedelta(seconds=1),
            attempts=lost_before + old_round,
            api_calls=lost_before + old_round + 1,
        )
        session.add(job)
        session.flush()
        number = 0
        for _ in range(old_round):  # lost before a replay: another round, not counted
            number += 1
            at = started - timedelta(seconds=1000 - number)
            session.add(
                Attempt(
                    job_id=job.id,
                    number=number,
                    started_at=at,
                    finished_at=at,
                    outcome_code=WORKER_LOST,
                )
            )
        for _ in range(lost_before):
            number += 1
            at = started + timedelta(seconds=number)
            session.add(
                Attempt(
                    job_id=job.id,
                    number=number,
                    started_at=at,
                    finished_at=at,
                    outcome_code=WORKER_LOST,
                )
            )
        session.add(
            Attempt(job_id=job.id, number=number + 1, started_at=now - timedelta(seconds=60))
        )
    return job.id, now


@pytest.mark.parametrize("old_round", [0, 2])
def test_sweeper_fails_a_job_whose_worker_was_lost_n_times(
    session_factory: sessionmaker[Session], old_round: int
) -> None:
    settings = Settings(max_attempts=10, max_worker_lost=3)
    second, now = _lost_job(session_factory, 1, old_round=old_round)
    third, _ = _lost_job(session_factory, 2, old_round=old_round)

    report = sweep_once(session_factory, RecordingPublisher(), settings, now=now)

    assert report.recovered == [second]
    assert report.failed == [third]
    with session_factory() as session:
        job = session.get(Job, third)
        assert job is not None
        assert job.status is JobStatus.failed
        assert job.last_error_code == WorkerLostError.CODE == "Internal.WorkerLost"
        assert job.last_error_message is not None and job.last_error_message.startswith("3 ")
        assert job.attempts < settings.max_attempts
        again = session.get(Job, second)
        assert again is not None and again.status is JobStatus.retrying
        assert again.last_error_code == WORKER_LOST


def test_a_worker_taking_over_a_lease_fails_the_job_at_n_lost_without_a_call(
    harness: Harness,
) -> None:
    assert harness.deps.settings.max_worker_lost == 3
    job_id, _ = _lost_job(harness.sessions, 2)

    assert harness.run(job_id) is Outcome.failed
    assert harness.client.calls == []
    job = harness.job(job_id)
    assert job.status is JobStatus.failed and job.last_error_code == "Internal.WorkerLost"
    assert job.api_calls == 3  # the claim's count undone: no call was made
    assert [a.outcome_code for a in harness.attempts(job_id)] == [WORKER_LOST] * 3
