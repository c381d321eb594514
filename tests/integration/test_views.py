"""The status JSON object: key names, date/height formats, API calls counted from attempt rows."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy.orm import Session

from models import Attempt, Job, JobEvent, JobStatus, Result, Warning
from tests.fixtures.workers import sealer_for_tests
from worker.store.views import job_view, new_job_view, not_found_view, result_view

RESULT_KEYS = {
    "cn_last_name",
    "en_last_name",
    "last_name_code",
    "cn_first_name",
    "en_first_name",
    "first_name_code",
    "id_number",
    "birthday",
    "sex",
    "first_issue_date",
    "current_issue_date",
    "validity_period",
    "symbol",
    "height",
    "angle",
    "resident_type",
    "request_id",
    "validity_period_text",
    "warning_service_disabled",
}
JOB_KEYS = {"job_id", "status", "attempts", "error_code", "error_message", "result", "warnings"}
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _result(job_id: uuid.UUID, **fields: object) -> Result:
    values: dict[str, object] = {
        "job_id": job_id,
        "request_id": "req-1",
        "cn_last_name": "陳",
        "en_last_name": "CHAN",
        "last_name_code": "7115",
        "cn_first_name": "大文",
        "en_first_name": "TAI MAN",
        "first_name_code": "1129 2429",
        "id_number": "1234567(8)",
        "birthday": date(1990, 2, 3),
        "sex": "男 M",
        "first_issue_date": date(2008, 1, 2),
        "current_issue_date": date(2018, 3, 4),
        "validity_period": date(2028, 3, 4),
        "validity_period_text": "04-03-2028",
        "symbol": "ASM",
        "height_m": Decimal("1.64"),
        "angle": 0.5,
        "resident_type": "Permanent Resident Identity Card",
        "warning_service_disabled": False,
    }
    values.update(fields)
    return Result(**sealer_for_tests().seal_result(job_id, values))


def _job(session: Session, **fields: object) -> Job:
    job_id = uuid.uuid4()
    url = sealer_for_tests().seal_url(job_id, "front_url", "https://example.com/f.jpg")
    job = Job(id=job_id, front_url=url, **fields)
    session.add(job)
    session.flush()
    return job


def test_result_view_keys_and_formats(db_session: Session) -> None:
    job = _job(db_session, status=JobStatus.succeeded)
    db_session.add(_result(job.id))
    db_session.flush()
    db_session.add_all(
        [
            Warning(job_id=job.id, code=-9107, name="glare"),
            Warning(job_id=job.id, code=-9102, name="photocopy"),
        ]
    )
    db_session.flush()

    view = job_view(db_session, job, sealer=sealer_for_tests())
    result = view["result"]
    assert set(result) - {"warnings"} == RESULT_KEYS
    assert result["id_number"] == "1234567(8)"
    assert result["birthday"] == "1990-02-03"
    assert result["validity_period"] == "2028-03-04"
    assert result["height"] == "1.64"
    assert result["angle"] == 0.5
    assert view["warnings"] == [
        {"code": -9107, "name": "glare"},
        {"code": -9102, "name": "photocopy"},
    ]
    assert result["warnings"] == view["warnings"]


def test_validity_period_text_when_not_a_date(db_session: Session) -> None:
    job = _job(db_session)
    result = _result(job.id, validity_period=None, validity_period_text="永久 Permanent")
    view = result_view(sealer_for_tests().open_result(result), [])
    assert view["validity_period"] == "永久 Permanent"
    assert view["validity_period_text"] == "永久 Permanent"
    assert view["warnings"] == []


def test_height_keeps_two_decimals() -> None:
    sealer = sealer_for_tests()
    view = result_view(sealer.open_result(_result(uuid.uuid4(), height_m=Decimal("1.7"))), [])
    assert view["height"] == "1.70"
    unknown = sealer.open_result(_result(uuid.uuid4(), height_m=None))
    assert result_view(unknown, [])["height"] is None


def test_attempts_counts_every_api_call_and_history_is_ordered(db_session: Session) -> None:
    job = _job(
        db_session,
        status=JobStatus.failed,
        attempts=1,  # the budget: throttles did not spend it
        last_error_code="FailedOperation.ImageNoSpecifiedCard",
        last_error_message="no card",
        finished_at=T0 + timedelta(seconds=3),
    )
    db_session.add_all(
        [
            Attempt(job_id=job.id, number=1, started_at=T0, outcome_code="RequestLimitExceeded"),
            Attempt(
                job_id=job.id,
                number=2,
                started_at=T0 + timedelta(seconds=2),
                outcome_code="FailedOperation.ImageNoSpecifiedCard",
                request_id="r-2",
            ),
            JobEvent(job_id=job.id, at=T0 + timedelta(seconds=1), kind="recovered"),
        ]
    )
    db_session.flush()

    view = job_view(db_session, job, history=True, sealer=sealer_for_tests())
    assert set(view) >= JOB_KEYS
    assert view["attempts"] == 2
    assert view["budget_attempts"] == 1
    assert view["status"] == "failed"
    assert view["error_code"] == "FailedOperation.ImageNoSpecifiedCard"
    assert view["error_message"] == "no card"
    assert view["result"] is None
    assert view["warnings"] == []
    assert view["finished_at"] == (T0 + timedelta(seconds=3)).isoformat()
    assert [(h["type"], h.get("number"), h.get("kind")) for h in view["history"]] == [
        ("attempt", 1, None),
        ("event", None, "recovered"),
        ("attempt", 2, None),
    ]
    assert "history" not in job_view(db_session, job, sealer=sealer_for_tests())


def test_not_found_view() -> None:
    assert not_found_view("nope") == {"job_id": "nope", "status": "not_found"}


def test_new_job_view_is_the_queried_view_of_a_new_job(db_session: Session) -> None:
    # The API answers a submit with new_job_view (no queries): the same object job_view
    # would read for the job at that point, key for key.
    job = _job(db_session, status=JobStatus.queued, tag="t", batch="b", portrait=True)
    assert new_job_view(job) == job_view(db_session, job, sealer=sealer_for_tests())
    assert new_job_view(job)["attempts"] == 0 and new_job_view(job)["result"] is None
