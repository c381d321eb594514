"""The JSON shape of a job, as `status --json`, `jobs --json`, replay and the demo print it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import Attempt, DecisionReason, Job, JobEvent, Result, Warning
from worker.privacy.seal import Sealer
from worker.tencent.types import CardWarning, OcrResult


def _iso(value: date | datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _height(value: Decimal | None) -> str | None:
    # Metres as the API writes them ("1.64"), not a float that might print 1.6399999.
    return None if value is None else f"{value:.2f}"


def warnings_view(warnings: Sequence[Warning | CardWarning]) -> list[dict[str, Any]]:
    """[{code, name}] in the order given (the API's order, as stored)."""
    return [{"code": w.code, "name": w.name} for w in warnings]


def result_view(result: OcrResult, warnings: Sequence[Warning | CardWarning]) -> dict[str, Any]:
    """Every response field under the snake_case of its API name (`ID` is `id_number`).

    Takes the client's OcrResult (`macao-ocr read`) or a stored row opened by
    `Sealer.open_result`: one shape."""
    validity: str | None = _iso(result.validity_period)
    if validity is None:
        # A card of a holder aged 60+ has no expiry date: show the card's own text.
        validity = result.validity_period_text
    return {
        "cn_last_name": result.cn_last_name,
        "en_last_name": result.en_last_name,
        "last_name_code": result.last_name_code,
        "cn_first_name": result.cn_first_name,
        "en_first_name": result.en_first_name,
        "first_name_code": result.first_name_code,
        "id_number": result.id_number,
        "birthday": _iso(result.birthday),
        "sex": result.sex,
        "first_issue_date": _iso(result.first_issue_date),
        "current_issue_date": _iso(result.current_issue_date),
        "validity_period": validity,
        "validity_period_text": result.validity_period_text,
        "symbol": result.symbol,
        "height": _height(result.height_m),
        "angle": result.angle,
        "resident_type": result.resident_type,
        "request_id": result.request_id,
        "warning_service_disabled": result.warning_service_disabled,
        "warnings": warnings_view(warnings),
    }


def reasons_view(reasons: Sequence[DecisionReason]) -> list[dict[str, str]]:
    """[{code, source, detail}] in the decision's order."""
    return [{"code": r.code, "source": r.source, "detail": r.detail} for r in reasons]


def _history(session: Session, job: Job) -> list[dict[str, Any]]:
    attempts = session.scalars(
        select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)
    ).all()
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.at, JobEvent.id)
    ).all()
    items: list[tuple[datetime, dict[str, Any]]] = [
        (
            a.started_at,
            {
                "type": "attempt",
                "at": _iso(a.started_at),
                "number": a.number,
                "outcome_code": a.outcome_code,
                "message": a.message,
                "request_id": a.request_id,
                "latency_ms": a.latency_ms,
            },
        )
        for a in attempts
    ]
    items += [
        (
            e.at,
            {
                "type": "event",
                "at": _iso(e.at),
                "kind": e.kind,
                "actor": e.actor,
                "reason": e.reason,
                "previous_status": e.previous_status,
                "previous_error_code": e.previous_error_code,
            },
        )
        for e in events
    ]
    return [item for _, item in sorted(items, key=lambda pair: pair[0])]


def job_view(
    session: Session, job: Job, *, sealer: Sealer, history: bool = False
) -> dict[str, Any]:
    """The status object of one job: status, API calls made, last error, result (its
    personal fields opened by `sealer`), warnings."""
    api_calls = session.scalar(
        select(func.count()).select_from(Attempt).where(Attempt.job_id == job.id)
    )
    result = session.get(Result, job.id)
    warnings: Sequence[Warning] = ()
    reasons: Sequence[DecisionReason] = ()
    if result is not None:
        warnings = session.scalars(
            select(Warning).where(Warning.job_id == job.id).order_by(Warning.id)
        ).all()
        reasons = session.scalars(
            select(DecisionReason)
            .where(DecisionReason.job_id == job.id)
            .order_by(DecisionReason.id)
        ).all()
    opened = None if result is None else result_view(sealer.open_result(result), warnings)
    view = _view(job, api_calls or 0, result, opened, warnings, reasons)
    if history:
        view["history"] = _history(session, job)
    return view


def new_job_view(job: Job) -> dict[str, Any]:
    """`job_view` of a job stored in the caller's own transaction, not yet committed, with no
    query: nobody can have made an API call for it or stored its result yet (the HTTP API's
    answer to a submit, which would otherwise pay two statements per job for zeros)."""
    return _view(job, 0, None, None, (), ())


def _view(
    job: Job,
    api_calls: int,
    result: Result | None,
    opened: dict[str, Any] | None,
    warnings: Sequence[Warning],
    reasons: Sequence[DecisionReason],
) -> dict[str, Any]:
    return {
        "job_id": str(job.id),
        "status": str(job.status),
        # Every API call made for the job (one attempt row each), budget-spending or not.
        "attempts": api_calls,
        "budget_attempts": job.attempts,
        "error_code": job.last_error_code,
        "error_message": job.last_error_message,
        "result": opened,
        "warnings": warnings_view(warnings),
        # clear | consider | reject; None until the job succeeded (or for a result stored
        # before decisions existed: `macao-ocr decide` makes it).
        "decision": None if result is None else result.decision,
        "reasons": reasons_view(reasons),
        "tag": job.tag,
        "batch": job.batch,
        "portrait": job.portrait,
        "created_at": _iso(job.created_at),
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "next_attempt_at": _iso(job.next_attempt_at),
    }


def not_found_view(job_id: str) -> dict[str, Any]:
    """What `status` prints for an id that is unknown (or another tenant's)."""
    return {"job_id": job_id, "status": "not_found"}
