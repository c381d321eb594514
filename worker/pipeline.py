"""The job state machine: claim, quota wait, one API call per attempt, record, finalize.

Plain code, no Celery: the task is a thin wrapper, and tests drive this with fakes.
SQL work runs synchronously in the calling (task) thread, in short transactions that never
span an API call; the awaitable part (circuit, limiter slot, sleep, the call) runs as ONE
coroutine on the process's event loop through `deps.run`, so no SQL and no thread hop sits
between the slot the shared limiter grants and the request leaving. The attempt row is
therefore opened just before the slot is reserved, and dropped again if no call follows.

State rules (all timestamps UTC):
- A job is claimed atomically (queued/retrying and due, or running with an expired lease);
  anything else is a duplicate or early message and is dropped: the database, not the
  broker, decides what runs, and the sweeper republishes what becomes due.
- Retries are scheduled in the database (`retrying` + `next_attempt_at`), never with Celery
  ETAs. Deferrals (quota, account pause, Redis unreachable) spend no budget.
- `attempts` counts budget-spending calls (success included: it is an attempt at the job);
  `api_calls` counts every call. After a success `last_error_*` keep the last failure as
  history: the attempt rows tell the whole story and `status` says it succeeded.
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import Table, and_, bindparam, delete, exc, func, insert, or_, select, update
from sqlalchemy.orm import Session

from models import Attempt, Job, JobStatus, Portrait, Result, Warning
from models.base import UTCDateTime, utcnow
from worker import metrics
from worker.backoff import full_jitter_s, retry_for
from worker.circuit import AccountCircuit
from worker.errors import (
    AccountError,
    ApiError,
    InputError,
    NotFoundError,
    PermanentError,
    ResignError,
    StateUnavailable,
    ThrottledError,
    TransientError,
    TransportError,
    UnknownCodeError,
)
from worker.limiter import RateLimiter
from worker.ocr_types import OcrRequest, OcrResult
from worker.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# The per-job path runs Core statements on the mapped tables: the ORM's per-statement
# bookkeeping (identity map, unit of work, bulk-update compile) was half a worker's CPU.
JOB: Table = Job.__table__  # type: ignore[assignment]
ATTEMPT: Table = Attempt.__table__  # type: ignore[assignment]
RESULT: Table = Result.__table__  # type: ignore[assignment]
WARNING: Table = Warning.__table__  # type: ignore[assignment]
PORTRAIT: Table = Portrait.__table__  # type: ignore[assignment]

# Redis (limiter/circuit) unreachable: look again soon, never call blind.
STATE_UNAVAILABLE_DEFER_S = 5.0
# A job waiting out an account pause comes back at most about this often (see _pause_delay_s).
PAUSE_DEFER_MAX_S = 300.0
# Grace on top of the client's own total timeout before we give up on a call ourselves.
CALL_GUARD_S = 10.0
# The limiter hands out slots centred in their 1/qps interval (half a slot of margin each
# way). Everything between our slot and the server's count is delay, never advance: the loop
# waking up, signing, the network, the server reading the body. So we leave a quarter slot
# early, trading margin we cannot use (early) for margin we need (late); a quarter slot
# early is still inside the slot, whatever the adapted rate (slots only get wider).
SEND_LEAD_SLOT_FRACTION = 0.25
# Transit still ahead of a call when the loop wakes (signing, network, the server reading
# the body), in slots at the configured qps. A call woken later than its slot's slack (the
# limiter says how far its 1-second window still runs) plus the lead, less this transit,
# would land in the next window, which is full: take a fresh slot instead. Only the last
# slot of a window has as little as half a slot of slack; the others have more. Generous on
# purpose: a wasted slot costs one call, a throttle costs a step down of the shared rate.
TRANSIT_GUARD_SLOT_FRACTION = 0.5


class CoroutineRunner(Protocol):
    """Runs a coroutine on the process's event loop and returns its result to this thread."""

    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


class OcrApi(Protocol):
    """What the pipeline needs of `worker.tencent_client.OcrClient`."""

    async def recognize(self, request: OcrRequest) -> OcrResult: ...


class Outcome(enum.StrEnum):
    """What one `process_job` run did (for the task's log line and for tests)."""

    not_claimed = "not_claimed"
    already_succeeded = "already_succeeded"
    succeeded = "succeeded"
    failed = "failed"
    retrying = "retrying"
    deferred = "deferred"


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for `db_write_retry_s`.

    `claimed` says whether this run holds the job: if not, the message should go back to
    the queue; if so, the job's lease brings it back through the sweeper."""

    def __init__(self, *, claimed: bool) -> None:
        super().__init__("database unavailable")
        self.claimed = claimed


def _default_load_request(session: Session, job: Job) -> OcrRequest:
    from worker.images import load_request

    return load_request(session, job)


def _default_validate(request: OcrRequest) -> None:
    from worker.validation import validate_request

    validate_request(request)


@dataclass(frozen=True)
class PipelineDeps:
    """Everything `process_job` touches, injected (the runtime builds the real ones)."""

    settings: Settings
    session_factory: Callable[[], Session]
    client: OcrApi
    limiter: RateLimiter
    circuit: AccountCircuit
    limiter_key: str
    run: CoroutineRunner
    worker_host: str = field(default_factory=socket.gethostname)
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    load_request: Callable[[Session, Job], OcrRequest] = _default_load_request
    validate: Callable[[OcrRequest], None] = _default_validate


@dataclass(frozen=True)
class _Gate:
    """The pre-call checks' verdict: go after `wait_s`, or defer by `delay_s`."""

    granted: bool
    wait_s: float = 0.0
    # time.monotonic() of our slot (less the lead), counted from when we asked for it.
    send_at: float = 0.0
    # How late we may wake and still send: see TRANSIT_GUARD_SLOT_FRACTION.
    late_limit_s: float = math.inf
    delay_s: float = 0.0
    reason: str = ""
    probe: bool = False
    # The slot's window and its size, handed back to the limiter if the call is throttled.
    window: int | None = None
    window_cap: int = 0


@dataclass(frozen=True)
class _Call:
    """One API call's outcome, measured on the loop."""

    started_at: datetime
    finished_at: datetime
    latency_ms: int
    result: OcrResult | None = None
    error: ApiError | None = None
    input_error: InputError | None = None
    slot_late_ms: int = 0
    # From the gate: how long we waited for the slot, whether we hold the pause's probe,
    # and the slot's window (evidence for the limiter when the call is throttled).
    wait_s: float = 0.0
    probe: bool = False
    window: int | None = None
    window_cap: int = 0

    @property
    def code(self) -> str:
        if self.result is not None:
            return "OK"
        if self.input_error is not None:
            return self.input_error.code
        assert self.error is not None
        return self.error.code

    @property
    def request_id(self) -> str | None:
        if self.result is not None:
            return self.result.request_id
        return self.error.request_id if self.error is not None else None


@dataclass
class _JobInfo:
    # The age limit counts from here: the first claim since creation or since a replay
    # (replay clears started_at), so a replayed dead letter gets a full age budget.
    age_from: datetime
    attempts: int
    portrait: bool


# -- database helpers


def _db_unavailable(err: BaseException) -> bool:
    """Errors worth waiting out: the server is restarting, the pool is exhausted, a lock."""
    if isinstance(err, exc.DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, exc.OperationalError | exc.InterfaceError | exc.TimeoutError)


def _with_db(deps: PipelineDeps, fn: Callable[[], T], *, job_id: uuid.UUID, claimed: bool) -> T:
    """Run a unit of SQL work, riding out a database outage for up to db_write_retry_s."""

    def on_retry(err: BaseException, tries: int, delay_s: float) -> None:
        log.warning(
            "db_retry",
            job_id=str(job_id),
            error_type=type(err).__name__,
            tries=tries,
            delay_s=round(delay_s, 3),
        )

    try:
        return retry_for(
            fn,
            retry_on=_db_unavailable,
            budget_s=deps.settings.db_write_retry_s,
            on_retry=on_retry,
            sleep=deps.sleep,
            rng=deps.rng,
        )
    except exc.SQLAlchemyError as err:
        if _db_unavailable(err):
            raise DatabaseUnavailable(claimed=claimed) from None
        raise


def _utc_param(name: str, value: datetime) -> Any:
    return bindparam(name, value, type_=UTCDateTime())


# -- step 1: claim


def _claim(session: Session, deps: PipelineDeps, job_id: uuid.UUID, now: datetime) -> bool:
    lease_until = now + timedelta(seconds=deps.settings.lease_s)
    due = or_(JOB.c.next_attempt_at.is_(None), JOB.c.next_attempt_at <= now)
    claimable = or_(
        and_(JOB.c.status.in_([JobStatus.queued, JobStatus.retrying]), due),
        and_(JOB.c.status == JobStatus.running, JOB.c.lease_expires_at < now),
    )
    row = session.execute(
        update(JOB)
        .where(JOB.c.id == job_id, claimable)
        .values(
            status=JobStatus.running,
            lease_expires_at=lease_until,
            started_at=func.coalesce(JOB.c.started_at, _utc_param("claim_now", now)),
            worker_host=deps.worker_host,
        )
        .returning(JOB.c.id)
    ).first()
    if row is None:
        return False
    # An attempt still open belongs to a worker that died mid-call (we took its expired
    # lease): close it as the sweeper would, spending budget so a poison job ends.
    lost = session.execute(
        update(ATTEMPT)
        .where(ATTEMPT.c.job_id == job_id, ATTEMPT.c.finished_at.is_(None))
        .values(finished_at=now, outcome_code="WorkerLost", message="worker lost mid-call")
    )
    lost_count = int(getattr(lost, "rowcount", 0) or 0)
    if lost_count:
        session.execute(
            update(JOB).where(JOB.c.id == job_id).values(attempts=JOB.c.attempts + lost_count)
        )
    return True


# -- step 2: load


def _load(
    session: Session, deps: PipelineDeps, job_id: uuid.UUID, now: datetime
) -> tuple[OcrRequest, _JobInfo] | Outcome | InputError | NotFoundError:
    """The request to send, or why there is none: bought already, or input refused (the
    job is failed in this transaction; the caller logs it once the commit holds)."""
    bought = session.execute(select(RESULT.c.job_id).where(RESULT.c.job_id == job_id)).first()
    if bought is not None:
        # Bought already (a crash between finalize and ack, or a replayed message).
        session.execute(
            update(JOB)
            .where(JOB.c.id == job_id)
            .values(
                status=JobStatus.succeeded,
                finished_at=func.coalesce(JOB.c.finished_at, _utc_param("done_now", now)),
                lease_expires_at=None,
                next_attempt_at=None,
            )
        )
        return Outcome.already_succeeded
    job = session.get(Job, job_id)
    assert job is not None  # claimed a moment ago; rows are never deleted under us
    info = _JobInfo(
        age_from=job.started_at or job.created_at,
        attempts=job.attempts,
        portrait=job.portrait,
    )
    try:
        request = deps.load_request(session, job)
        deps.validate(request)
    except (InputError, NotFoundError) as err:
        # Rejected before any call: the producer validated, so this is rare (a stored
        # image gone, rules tightened since submit). Fail it with the rule's code.
        _fail(session, job_id, now, err.code, err.message)
        return err
    return request, info


@dataclass(frozen=True)
class _Started:
    request: OcrRequest
    info: _JobInfo
    number: int  # the first attempt, opened


def _start(deps: PipelineDeps, job_id: uuid.UUID) -> _Started | Outcome:
    """Claim, load and open the first attempt in ONE transaction (one commit per job start):
    if any part fails, none of it holds, and the message is simply delivered again."""
    now = deps.clock()
    with deps.session_factory() as session, session.begin():
        if not _claim(session, deps, job_id, now):
            return Outcome.not_claimed
        loaded = _load(session, deps, job_id, now)
        if isinstance(loaded, Outcome):
            return loaded
        if isinstance(loaded, InputError | NotFoundError):
            refused = loaded
        else:
            request, info = loaded
            return _Started(request, info, _open_attempt_in(session, deps, job_id, now))
    log.warning("job_failed", job_id=str(job_id), error_code=refused.code, api_calls=0)
    metrics.job_finished(JobStatus.failed.value)
    return Outcome.failed


# -- step 3: the gate and the call, on the event loop


def _pause_delay_s(deps: PipelineDeps, since: datetime) -> float:
    """How long a job waits out an account pause. It grows with the pause (a billing problem
    can last hours; a large backlog must not cycle through the database every probe
    interval), capped so work resumes within minutes of the probe closing the circuit."""
    interval = deps.settings.circuit_probe_interval_s
    age_s = max(0.0, (deps.clock() - since).total_seconds())
    base = max(interval, min(age_s, PAUSE_DEFER_MAX_S))
    return deps.rng.uniform(base, 1.5 * base)


async def _gate(deps: PipelineDeps, *, max_wait_s: float, holds_probe: bool) -> _Gate:
    probe = holds_probe
    try:
        if not holds_probe:
            pause = await deps.circuit.pause()
            if pause is not None:
                if not await deps.circuit.claim_probe(deps.settings.circuit_probe_interval_s):
                    delay = _pause_delay_s(deps, pause.since)
                    return _Gate(granted=False, delay_s=delay, reason="account_paused")
                probe = True
        # wait_s counts from the moment the limiter read its clock, which is close to when we
        # sent the request; our resumption after the reply can lag far behind on a busy CPU.
        # Counting from before the request keeps that lag from shifting the call.
        asked_at = time.monotonic()
        reservation = await deps.limiter.reserve(deps.limiter_key, max_wait_s=max_wait_s)
    except StateUnavailable:
        delay = deps.rng.uniform(STATE_UNAVAILABLE_DEFER_S, 2 * STATE_UNAVAILABLE_DEFER_S)
        return _Gate(granted=False, delay_s=delay, reason="state_unavailable")
    if not reservation.granted:
        # Our turn is about wait_s away. Come back at a random point before it: early is
        # harmless (the job queues again), late lets the queue run dry and wastes quota; the
        # spread keeps deferred jobs from all returning at one instant.
        delay = deps.rng.uniform(0.5 * reservation.wait_s, reservation.wait_s)
        return _Gate(granted=False, delay_s=delay, reason="quota")
    qps = deps.settings.qps
    lead_s = min(reservation.wait_s, SEND_LEAD_SLOT_FRACTION / qps) if qps > 0 else 0.0
    late_limit_s = math.inf
    if qps > 0:
        late_limit_s = reservation.slack_s + lead_s - TRANSIT_GUARD_SLOT_FRACTION / qps
    return _Gate(
        granted=True,
        wait_s=reservation.wait_s,
        send_at=asked_at + reservation.wait_s - lead_s,
        late_limit_s=late_limit_s,
        probe=probe,
        window=reservation.window,
        window_cap=reservation.window_cap,
    )


async def _gate_and_send(
    deps: PipelineDeps, request: OcrRequest, *, window_ends: float, holds_probe: bool
) -> _Gate | _Call:
    """Circuit, slot, sleep, call: one coroutine, so nothing but the loop's own wake-up
    stands between the slot the limiter gave and the request leaving.

    If the loop wakes so late that the call would leave its slot (a starved CPU), the slot
    is given up and a fresh one taken: a wasted slot costs a little throughput, a call in
    the wrong window costs a throttle."""
    missed = 0
    while True:
        max_wait_s = max(0.0, window_ends - time.monotonic())
        gate = await _gate(deps, max_wait_s=max_wait_s, holds_probe=holds_probe)
        if not gate.granted:
            return gate
        holds_probe = gate.probe
        delay = gate.send_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        late_s = time.monotonic() - gate.send_at
        if late_s > gate.late_limit_s:
            missed += 1
            log.warning("slot_missed", slot_late_ms=int(late_s * 1000), missed=missed)
            continue
        call = await _send(deps, request, late_s)
        return replace(
            call,
            wait_s=gate.wait_s,
            probe=gate.probe,
            window=gate.window,
            window_cap=gate.window_cap,
        )


async def _send(deps: PipelineDeps, request: OcrRequest, late_s: float) -> _Call:
    """Make exactly one call now (the client signs it right then)."""
    started_at = deps.clock()
    # How late the loop woke for our slot: the number to watch when the API throttles a
    # fleet that the limiter says is in line.
    slot_late_ms = max(0, int(late_s * 1000))
    t0 = time.perf_counter()
    result: OcrResult | None = None
    error: ApiError | None = None
    input_error: InputError | None = None
    try:
        async with asyncio.timeout(deps.settings.total_timeout_s + CALL_GUARD_S):
            result = await deps.client.recognize(request)
    except ApiError as err:
        error = err
    except InputError as err:
        input_error = err
    except TimeoutError:
        error = TransportError("Transport.Timeout", "call exceeded the worker's guard timeout")
    except Exception as err:
        # The client translates every foreign error; this is a bug, not an answer. Record it
        # as transient (budget-bound) without its text, which we cannot vouch for.
        log.error("client_bug", error_type=type(err).__name__)
        error = TransportError(f"Worker.{type(err).__name__}", "unexpected client error")
    latency_ms = int((time.perf_counter() - t0) * 1000)
    return _Call(
        started_at=started_at,
        finished_at=deps.clock(),
        latency_ms=latency_ms,
        result=result,
        error=error,
        input_error=input_error,
        slot_late_ms=slot_late_ms,
    )


def _open_attempt(deps: PipelineDeps, job_id: uuid.UUID) -> int:
    """Open another attempt (after a throttle or a re-sign), in its own transaction."""
    with deps.session_factory() as session, session.begin():
        return _open_attempt_in(session, deps, job_id, deps.clock())


def _open_attempt_in(session: Session, deps: PipelineDeps, job_id: uuid.UUID, now: datetime) -> int:
    """Insert the attempt row BEFORE reserving a slot, so no SQL sits between the slot and
    the call (the quota's margin is tens of milliseconds). A SIGKILL leaves the row open
    for the sweeper to close as WorkerLost. Also counts the call and renews the lease over
    the longest quota wait plus the call."""
    lease_s = deps.settings.lease_s + deps.settings.max_quota_wait_s
    number = session.execute(
        select(func.coalesce(func.max(ATTEMPT.c.number), 0) + 1).where(
            ATTEMPT.c.job_id == job_id
        )
    ).scalar_one()
    session.execute(
        insert(ATTEMPT).values(
            job_id=job_id, number=int(number), started_at=now, worker_host=deps.worker_host
        )
    )
    session.execute(
        update(JOB)
        .where(JOB.c.id == job_id)
        .values(api_calls=JOB.c.api_calls + 1, lease_expires_at=now + timedelta(seconds=lease_s))
    )
    return int(number)


def _drop_attempt(session: Session, job_id: uuid.UUID, number: int) -> None:
    """The slot was refused or never used: there was no call, so no attempt and no count."""
    session.execute(delete(ATTEMPT).where(ATTEMPT.c.job_id == job_id, ATTEMPT.c.number == number))
    session.execute(
        update(JOB)
        .where(JOB.c.id == job_id)
        .values(api_calls=JOB.c.api_calls - 1)
    )


def _close_attempt(session: Session, job_id: uuid.UUID, number: int, call: _Call) -> None:
    message = None
    if call.error is not None:
        message = call.error.message
    elif call.input_error is not None:
        message = call.input_error.message
    session.execute(
        update(ATTEMPT)
        .where(ATTEMPT.c.job_id == job_id, ATTEMPT.c.number == number)
        .values(
            started_at=call.started_at,
            finished_at=call.finished_at,
            outcome_code=call.code,
            message=message,
            request_id=call.request_id,
            latency_ms=call.latency_ms,
        )
    )


# -- step 4: outcomes, each one transaction


def _fail(session: Session, job_id: uuid.UUID, now: datetime, code: str, message: str) -> None:
    session.execute(
        update(JOB)
        .where(JOB.c.id == job_id)
        .values(
            status=JobStatus.failed,
            finished_at=now,
            lease_expires_at=None,
            next_attempt_at=None,
            last_error_code=code,
            last_error_message=message,
        )
    )


def _record_and_defer(
    deps: PipelineDeps,
    job_id: uuid.UUID,
    *,
    delay_s: float,
    number: int | None = None,
    call: _Call | None = None,
    error: ApiError | None = None,
    drop: int | None = None,
) -> None:
    """Put the job back to wait without spending budget (quota, pause, Redis down).
    `drop`: an attempt row opened for a call that did not happen."""
    now = deps.clock()
    values: dict[str, Any] = {
        "status": JobStatus.retrying,
        "next_attempt_at": now + timedelta(seconds=max(0.0, delay_s)),
        "lease_expires_at": None,
    }
    if error is not None:
        values["last_error_code"] = error.code
        values["last_error_message"] = error.message

    def write() -> None:
        with deps.session_factory() as session, session.begin():
            if number is not None and call is not None:
                _close_attempt(session, job_id, number, call)
            if drop is not None:
                _drop_attempt(session, job_id, drop)
            session.execute(
                update(JOB)
                .where(JOB.c.id == job_id)
                .values(**values)
            )

    _with_db(deps, write, job_id=job_id, claimed=True)


def _record_only(deps: PipelineDeps, job_id: uuid.UUID, number: int, call: _Call) -> None:
    """Close an attempt whose outcome leaves the job running (throttle, re-sign)."""

    def write() -> None:
        with deps.session_factory() as session, session.begin():
            _close_attempt(session, job_id, number, call)
            session.execute(
                update(JOB)
                .where(JOB.c.id == job_id)
                .values(last_error_code=call.code, last_error_message=_message(call))
            )

    _with_db(deps, write, job_id=job_id, claimed=True)


def _message(call: _Call) -> str | None:
    if call.error is not None:
        return call.error.message
    return call.input_error.message if call.input_error is not None else None


def store_result(session: Session, job_id: uuid.UUID, result: OcrResult, portrait: bool) -> None:
    """Insert the result row, its warnings and (when asked for) the portrait; caller commits.

    A second result for the job raises IntegrityError (the result's key is the job id)."""
    session.execute(
        insert(RESULT).values(
            job_id=job_id,
            request_id=result.request_id,
            cn_last_name=result.cn_last_name,
            en_last_name=result.en_last_name,
            last_name_code=result.last_name_code,
            cn_first_name=result.cn_first_name,
            en_first_name=result.en_first_name,
            first_name_code=result.first_name_code,
            id_number=result.id_number,
            birthday=result.birthday,
            sex=result.sex,
            first_issue_date=result.first_issue_date,
            current_issue_date=result.current_issue_date,
            validity_period=result.validity_period,
            validity_period_text=result.validity_period_text,
            symbol=result.symbol,
            height_m=result.height_m,
            angle=result.angle,
            resident_type=result.resident_type,
            warning_service_disabled=result.warning_service_disabled,
        )
    )
    if result.warnings:
        session.execute(
            insert(WARNING),
            [{"job_id": job_id, "code": w.code, "name": w.name} for w in result.warnings],
        )
    if portrait and result.portrait is not None:
        session.execute(insert(PORTRAIT).values(job_id=job_id, data=result.portrait))


def _finalize_success(
    deps: PipelineDeps, job_id: uuid.UUID, number: int, call: _Call, info: _JobInfo
) -> None:
    """Result + warnings + portrait + job succeeded, in ONE transaction. A database outage
    here is ridden out in memory (the result is never bought twice)."""
    result = call.result
    assert result is not None

    def write() -> None:
        try:
            with deps.session_factory() as session, session.begin():
                store_result(session, job_id, result, info.portrait)
                _close_attempt(session, job_id, number, call)
                session.execute(
                    update(JOB)
                    .where(JOB.c.id == job_id)
                    .values(
                        status=JobStatus.succeeded,
                        finished_at=call.finished_at,
                        lease_expires_at=None,
                        next_attempt_at=None,
                        attempts=JOB.c.attempts + 1,
                    )
                )
        except exc.IntegrityError:
            # A result is already stored: our own commit that went through before the
            # connection dropped, or another run that took over an expired lease. A result
            # is only ever written with its job marked succeeded, so just record our call.
            with deps.session_factory() as session, session.begin():
                stored = select(RESULT.c.job_id).where(RESULT.c.job_id == job_id)
                if session.execute(stored).first() is None:
                    raise
                _close_attempt(session, job_id, number, call)
            log.warning("result_already_stored", job_id=str(job_id), attempt=number)

    _with_db(deps, write, job_id=job_id, claimed=True)


def _finalize_failure(
    deps: PipelineDeps, job_id: uuid.UUID, number: int, call: _Call, info: _JobInfo
) -> Outcome:
    """A budget-spending failure: retry later (scheduled in the database) or dead-letter."""
    error = call.error
    assert error is not None
    now = deps.clock()
    attempts = info.attempts + 1
    limit = (
        deps.settings.unknown_code_max_attempts
        if isinstance(error, UnknownCodeError)
        else deps.settings.max_attempts
    )
    too_old = (now - info.age_from).total_seconds() > deps.settings.max_age_s
    give_up = isinstance(error, PermanentError) or attempts >= limit or too_old
    delay_s = 0.0
    if not give_up:
        delay_s = full_jitter_s(
            attempts,
            base_s=deps.settings.backoff_base_s,
            max_s=deps.settings.backoff_max_s,
            rng=deps.rng,
        )

    def write() -> None:
        with deps.session_factory() as session, session.begin():
            _close_attempt(session, job_id, number, call)
            session.execute(
                update(JOB)
                .where(JOB.c.id == job_id)
                .values(attempts=JOB.c.attempts + 1)
            )
            if give_up:
                _fail(session, job_id, now, error.code, error.message)
            else:
                session.execute(
                    update(JOB)
                    .where(JOB.c.id == job_id)
                    .values(
                        status=JobStatus.retrying,
                        next_attempt_at=now + timedelta(seconds=delay_s),
                        lease_expires_at=None,
                        last_error_code=error.code,
                        last_error_message=error.message,
                    )
                )

    _with_db(deps, write, job_id=job_id, claimed=True)
    info.attempts = attempts
    if give_up:
        log.warning(
            "job_failed",
            job_id=str(job_id),
            error_code=error.code,
            attempt=number,
            attempts=attempts,
            too_old=too_old,
        )
        metrics.job_finished(JobStatus.failed.value)
        return Outcome.failed
    log.info(
        "job_retrying",
        job_id=str(job_id),
        error_code=error.code,
        attempt=number,
        attempts=attempts,
        delay_s=round(delay_s, 3),
    )
    metrics.retry(error.code)
    return Outcome.retrying


def _fail_without_call(deps: PipelineDeps, job_id: uuid.UUID, number: int, err: InputError) -> None:
    """The client refused the request before sending: no call happened, so no attempt."""

    def write() -> None:
        with deps.session_factory() as session, session.begin():
            _drop_attempt(session, job_id, number)
            _fail(session, job_id, deps.clock(), err.code, err.message)

    _with_db(deps, write, job_id=job_id, claimed=True)
    log.warning("job_failed", job_id=str(job_id), error_code=err.code, api_calls=0)
    metrics.job_finished(JobStatus.failed.value)


# -- the state machine


def _parse_id(job_id: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        return None


def process_job(job_id: str | uuid.UUID, deps: PipelineDeps) -> Outcome:
    """Run one job as far as it can go now. Job-level failures are recorded, not raised.

    Raises DatabaseUnavailable when SQL stays unreachable past db_write_retry_s."""
    jid = _parse_id(job_id)
    if jid is None:
        log.error("bad_job_id")  # not echoed: a malformed message is not ours to print
        return Outcome.not_claimed
    # Nothing of the start holds unless all of it commits: not claimed on a database error.
    started = _with_db(deps, lambda: _start(deps, jid), job_id=jid, claimed=False)
    if isinstance(started, Outcome):
        if started is Outcome.not_claimed:
            log.debug("job_not_claimed", job_id=str(jid))
        elif started is Outcome.already_succeeded:
            log.info("job_already_succeeded", job_id=str(jid))
        return started
    return _call_loop(deps, jid, started)


def _call_loop(deps: PipelineDeps, job_id: uuid.UUID, started: _Started) -> Outcome:
    settings = deps.settings
    request, info = started.request, started.info
    # Throttled answers are retried here, all within one quota-wait window; past it, defer.
    window_ends = time.monotonic() + settings.max_quota_wait_s
    resigned = False
    holds_probe = False
    opened: int | None = started.number
    while True:
        number = opened
        if number is None:
            number = _with_db(
                deps, partial(_open_attempt, deps, job_id), job_id=job_id, claimed=True
            )
        opened = None
        outcome = deps.run(
            _gate_and_send(deps, request, window_ends=window_ends, holds_probe=holds_probe)
        )
        if isinstance(outcome, _Gate):
            _record_and_defer(deps, job_id, delay_s=outcome.delay_s, drop=number)
            log.info(
                "job_deferred",
                job_id=str(job_id),
                reason=outcome.reason,
                delay_s=round(outcome.delay_s, 3),
            )
            return Outcome.deferred
        call = outcome
        holds_probe = call.probe
        metrics.limiter_wait(call.wait_s)
        log.info(
            "api_call",
            job_id=str(job_id),
            attempt=number,
            outcome_code=call.code,
            request_id=call.request_id,
            latency_ms=call.latency_ms,
            slot_late_ms=call.slot_late_ms,
        )
        if call.input_error is None:
            metrics.api_call(call.code, call.latency_ms / 1000.0)

        if call.result is not None:
            _finalize_success(deps, job_id, number, call, info)
            log.info("job_succeeded", job_id=str(job_id), attempt=number)
            metrics.job_finished(JobStatus.succeeded.value)
            if holds_probe:
                _resume_account(deps, job_id)
            return Outcome.succeeded
        if call.input_error is not None:
            _fail_without_call(deps, job_id, number, call.input_error)
            return Outcome.failed

        error = call.error
        assert error is not None
        if isinstance(error, ThrottledError):
            _record_only(deps, job_id, number, call)
            metrics.retry(error.code)
            _throttled(deps, call)
            continue
        if isinstance(error, ResignError) and not resigned:
            resigned = True
            _record_only(deps, job_id, number, call)
            metrics.retry(error.code)
            continue
        if isinstance(error, AccountError | ResignError):
            # A second SignatureExpire on the same job is clock skew: every call would fail.
            if isinstance(error, ResignError):
                error = AccountError(
                    error.code,
                    "signature expired twice in a row: check this host's clock",
                    request_id=error.request_id,
                )
            _pause_account(deps, job_id, error)
            _record_and_defer(
                deps,
                job_id,
                delay_s=settings.circuit_probe_interval_s,
                number=number,
                call=call,
                error=error,
            )
            return Outcome.deferred
        if isinstance(error, TransientError | PermanentError):
            return _finalize_failure(deps, job_id, number, call, info)
        # Any other ApiError subclass: treat like an unknown code (small budget).
        unknown = UnknownCodeError(error.code, error.message, request_id=error.request_id)
        return _finalize_failure(
            deps,
            job_id,
            number,
            replace(call, error=unknown),
            info,
        )


def _throttled(deps: PipelineDeps, call: _Call) -> None:
    throttled = deps.limiter.throttled(
        deps.limiter_key, window=call.window, window_cap=call.window_cap
    )
    try:
        rate = deps.run(throttled)
    except StateUnavailable:
        return
    metrics.set_effective_rate(rate, deps.settings.qps)


def _pause_account(deps: PipelineDeps, job_id: uuid.UUID, error: ApiError) -> None:
    try:
        opened = deps.run(deps.circuit.open(error.code, error.message))
    except StateUnavailable:
        opened = False
        log.error("account_pause_not_shared", job_id=str(job_id), error_code=error.code)
    if opened:
        # Loud, once per pause across the fleet: an operator must act (billing, keys, clock).
        log.error(
            "account_paused",
            job_id=str(job_id),
            error_code=error.code,
            error_message=error.message,
            request_id=error.request_id,
        )
        metrics.set_circuit(True)


def _resume_account(deps: PipelineDeps, job_id: uuid.UUID) -> None:
    try:
        deps.run(deps.circuit.close())
    except StateUnavailable:
        return
    log.warning("account_resumed", job_id=str(job_id))
    metrics.set_circuit(False)
