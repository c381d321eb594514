"""Poison jobs: an answer the API gave that could not be decoded or stored is kept, not lost.

A failure after the API answered must never buy the job again. The job fails at once with
`Internal.StoreFailed` and the `Response` object is kept in `kept_answer` (JSON, as received,
sealed by worker.privacy.seal: it holds personal data like a result, so it lives in the
database, encrypted, and never in a log). Once
the fault is fixed, `macao-ocr replay` parses and stores the kept answer (`store_kept`)
without a new call, and deletes it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, insert, select, update

from models import Attempt, Job, KeptAnswer
from worker.errors import StoreFailed
from worker.privacy.seal import Sealer
from worker.store import job_sql
from worker.tencent.response import parse_response

KEPT: Table = KeptAnswer.__table__  # type: ignore[assignment]
ATTEMPT: Table = Attempt.__table__  # type: ignore[assignment]
JOB: Table = Job.__table__  # type: ignore[assignment]


def answer_json(answer: Mapping[str, Any]) -> str:
    """The answer as JSON text any database stores (NULs and lone surrogates escaped)."""
    return json.dumps(answer, ensure_ascii=True, separators=(",", ":"))


def fail_keeping_answer(
    conn: Connection,
    job_id: uuid.UUID,
    number: int,
    call: job_sql.CallRecord,
    *,
    answer: Mapping[str, Any] | None,
    error: StoreFailed,
    now: datetime,
    sealer: Sealer,
) -> None:
    """Close the call's attempt (the API answered: its own code), spend it, keep the answer
    (when there is one) and fail the job with `Internal.StoreFailed`; the caller commits."""
    job_sql.close_attempt(conn, job_id, number, call)
    job_sql.spend(conn, job_id)
    if answer is not None:
        conn.execute(delete(KEPT).where(KEPT.c.job_id == job_id))
        conn.execute(
            insert(KEPT).values(
                job_id=job_id,
                attempt_number=number,
                request_id=call.request_id,
                response_json=sealer.seal_answer(job_id, answer_json(answer)),
                stage=error.stage,
                reason=error.reason,
                kept_at=now,
            )
        )
    job_sql.mark_failed(conn, job_id, now, error.code, error.message)


def has_kept(conn: Connection, job_id: uuid.UUID) -> bool:
    """Whether the job has a kept answer waiting to be stored."""
    return conn.execute(select(KEPT.c.job_id).where(KEPT.c.job_id == job_id)).first() is not None


def store_kept(
    conn: Connection, job_id: uuid.UUID, *, portrait: bool, now: datetime, sealer: Sealer
) -> None:
    """Parse the kept answer and store it as the job's result (job succeeded, answer
    deleted), with no API call; the caller commits. Raises StoreFailed when it still fails:
    run it in a savepoint, so that nothing of it then holds."""
    row = conn.execute(select(KEPT).where(KEPT.c.job_id == job_id)).first()
    if row is None:
        raise StoreFailed("store", "NoKeptAnswer")
    kept = row._mapping
    attempt = (
        conn.execute(
            select(ATTEMPT).where(
                ATTEMPT.c.job_id == job_id, ATTEMPT.c.number == kept["attempt_number"]
            )
        )
        .first()
        ._mapping  # type: ignore[union-attr]
    )
    call = job_sql.CallRecord(
        started_at=attempt["started_at"],
        finished_at=attempt["finished_at"] or now,
        code=attempt["outcome_code"] or "OK",
        message=attempt["message"],
        request_id=attempt["request_id"],
        latency_ms=attempt["latency_ms"] or 0,
    )
    try:
        result = parse_response(json.loads(sealer.open_answer(job_id, kept["response_json"])))
    except Exception as err:
        raise StoreFailed("decode", type(err).__name__) from None
    try:
        job_sql.store_success(
            conn, job_id, kept["attempt_number"], call, result, portrait, sealer=sealer
        )
    except Exception as err:
        raise StoreFailed("store", type(err).__name__) from None
    # The job finished now (store_success dates it from the call); the answer is stored.
    conn.execute(update(JOB).where(JOB.c.id == job_id).values(finished_at=now))
    conn.execute(delete(KEPT).where(KEPT.c.job_id == job_id))
