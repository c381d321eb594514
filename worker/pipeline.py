"""The job state machine: claim, quota wait, one API call per attempt, record, finalize.

Plain code, no Celery: the task is a thin wrapper, and tests drive this with fakes.
SQL work runs synchronously in the calling (task) thread, in short transactions that never
span an API call (a plain start and a success are one statement each on PostgreSQL, run
with no transaction around them); the awaitable part (circuit, limiter slot, sleep, the
call) runs as ONE coroutine on the process's event loop through `deps.run`, so no SQL and
no thread hop sits between the slot the shared limiter grants and the request leaving. The
attempt row is therefore opened just before the slot is reserved, and dropped again if no
call follows.

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
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import Connection, exc

from models import JobStatus
from models.base import utcnow
from worker import metrics, url_fallback
from worker.backoff import full_jitter_s, retry_for
from worker.decision.apply import decide_answer, limits_of
from worker.decision.engine import Decision
from worker.decision.facts import same_image
from worker.decision.policy import Policy, policy_for
from worker.errors import (
    AccountError,
    AnswerUndecodable,
    ApiError,
    InputError,
    NotFoundError,
    PermanentError,
    ResignError,
    StateUnavailable,
    StoreFailed,
    ThrottledError,
    TransientError,
    TransportError,
    UnknownCodeError,
    WorkerLostError,
)
from worker.membudget import ByteBudget, Held, held_bytes
from worker.privacy.seal import Sealer
from worker.quota.admission import Admission
from worker.quota.circuit import AccountCircuit
from worker.quota.limiter import RateLimiter
from worker.settings import Settings
from worker.store import fallback_sql, job_sql, kept
from worker.store.images import side_input
from worker.store.start import NotStarted, Started, refuse_start, start_job
from worker.tencent.types import OcrRequest, OcrResult

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Redis (limiter/circuit) unreachable: look again soon, never call blind.
STATE_UNAVAILABLE_DEFER_S = 5.0
# A job waiting out an account pause comes back at most about this often (see _pause_delay_s).
PAUSE_DEFER_MAX_S = 300.0
# Grace on top of the client's own total timeout before we give up on a call ourselves.
CALL_GUARD_S = 10.0
# The limiter hands out slots at least half a slot after their window's start, and the
# last one at least quota_edge_margin_s (and half a slot) before its end. Everything
# between our slot and the server's count is delay, never advance: the loop waking up,
# signing, the network, the server reading the body. So we leave a quarter slot early,
# trading margin we cannot use (early) for margin we need (late); a quarter slot early is
# still inside the window, whatever the adapted rate (slots only get wider).
SEND_LEAD_SLOT_FRACTION = 0.25
# Transit still ahead of a call when the loop wakes (signing, network, the server reading
# the body), in slots at the configured qps. A call woken later than its slot's slack (the
# limiter says how far its 1-second window still runs) plus the lead, less this transit,
# would land in the next window, which is full: take a fresh slot instead. Only the last
# slot of a window has as little as the edge margin of slack; the others have more. Generous on
# purpose: a wasted slot costs one call, a throttle costs a step down of the shared rate.
TRANSIT_GUARD_SLOT_FRACTION = 0.5
# A job deferred to its quota turn comes back this long plus one sweep interval before it:
# the sweeper publishes due jobs once per interval, then delivery and the claim take a
# moment. It then waits for its turn in process, so the line never runs dry (see
# quota_return_lead_s).
QUOTA_RETURN_MARGIN_S = 1.0


class CoroutineRunner(Protocol):
    """Runs a coroutine on the process's event loop and returns its result to this thread."""

    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


class OcrApi(Protocol):
    """What the pipeline needs of `worker.tencent.client.OcrClient`."""

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


def _default_validate(request: OcrRequest) -> None:
    from worker.tencent.validation import validate_request

    validate_request(request)


@dataclass(frozen=True)
class PipelineDeps:
    """Everything `process_job` touches, injected (the runtime builds the real ones)."""

    settings: Settings
    # Opens one transaction and yields its connection (commits on exit, rolls back on an
    # error): `engine.begin` in a worker, a savepoint on the test's connection in tests. Not
    # an ORM Session: the pipeline runs prebuilt Core statements, and a Session around each
    # transaction cost a busy worker about 2.5% of its CPU.
    transaction: Callable[[], AbstractContextManager[Connection]]
    client: OcrApi
    limiter: RateLimiter
    circuit: AccountCircuit
    limiter_key: str
    run: CoroutineRunner
    # Seals and opens personal data (worker.privacy.seal), built once by the runtime.
    sealer: Sealer
    worker_host: str = field(default_factory=socket.gethostname)
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    validate: Callable[[OcrRequest], None] = _default_validate
    # PostgreSQL only: a connection with no transaction around its statements, for the units
    # that are ONE statement there (job_sql.claim_plain, job_sql.store_success), which saves
    # the BEGIN and COMMIT round trips (`worker.store.engine.make_autocommit_engine`).
    # None: `transaction`.
    statement: Callable[[], AbstractContextManager[Connection]] | None = None
    # A tenant's warning policy (`worker.decision.store.PolicyCache` in a worker: read from
    # SQL at most once per 30 s per process). None: the defaults and MACAO_OCR_WARNING_POLICY.
    policies: Callable[[str], Policy] | None = None
    # The process's bound on image bytes in flight (MACAO_OCR_MAX_INFLIGHT_BYTES); None:
    # unbounded (tests).
    memory: ByteBudget | None = None
    # The process's bound on jobs in the quota wait (worker.quota.admission); None: no bound
    # (no quota, or tests).
    admission: Admission | None = None


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
    # Refused for quota: the turn (or slot) the job holds, seconds from the refusal.
    turn_s: float | None = None
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
    # Answered with a success the client could not decode (a poison job; never retried).
    undecodable: AnswerUndecodable | None = None
    slot_late_ms: int = 0
    # From the gate: how long we waited for the slot, whether we hold the pause's probe,
    # and the slot's window (evidence for the limiter when the call is throttled).
    wait_s: float = 0.0
    probe: bool = False
    window: int | None = None
    window_cap: int = 0

    @property
    def code(self) -> str:
        if self.result is not None or self.undecodable is not None:
            return "OK"
        if self.input_error is not None:
            return self.input_error.code
        assert self.error is not None
        return self.error.code

    @property
    def request_id(self) -> str | None:
        if self.result is not None:
            return self.result.request_id
        if self.undecodable is not None:
            rid = self.undecodable.answer.get("RequestId")
            return rid if isinstance(rid, str) else None
        return self.error.request_id if self.error is not None else None


@dataclass
class _JobInfo:
    # The age limit counts from here: the first claim since creation or since a replay
    # (replay clears started_at), so a replayed dead letter gets a full age budget.
    age_from: datetime
    attempts: int
    portrait: bool
    tenant: str = "default"
    # Front and back were sent and are one image (the `sides_identical` check).
    sides_identical: bool = False
    # The quota turn the job holds from its last deferral (None: it has no place yet).
    quota_turn_at: datetime | None = None


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


# -- step 1: claim and load with the first attempt, in one statement or one transaction


def _request_from(claimed: job_sql.Claimed) -> OcrRequest:
    """The request to send, rebuilt from the claim's row (URLs or the stored bytes)."""
    return OcrRequest(
        front=side_input(claimed.front_url, claimed.front_image_id, claimed.front_data),
        back=side_input(claimed.back_url, claimed.back_image_id, claimed.back_data),
        portrait=claimed.portrait,
    )


@dataclass(frozen=True)
class _Started:
    request: OcrRequest
    info: _JobInfo
    number: int  # the first attempt, opened


def _start(deps: PipelineDeps, job_id: uuid.UUID, inline_max: int) -> Started | Outcome:
    """Claim, load (images up to `inline_max` bytes) and open the next attempt
    (`worker.store.start`)."""
    now = deps.clock()
    started = start_job(
        job_id,
        statement=deps.statement,
        transaction=deps.transaction,
        now=now,
        lease_until=_call_lease_until(deps, now),
        host=deps.worker_host,
        sealer=deps.sealer,
        max_worker_lost=deps.settings.max_worker_lost,
        inline_max=inline_max,
    )
    if isinstance(started, NotStarted):
        return Outcome(started.value)
    return started


def _prepare(
    deps: PipelineDeps, job_id: uuid.UUID, started: Started, held: Held
) -> _Started | Outcome:
    """Room in memory for the job's images (read now if the claim left them out), then the
    request, checked.

    Rejected before any call: the producer validated, so this is rare (a stored image gone,
    rules tightened since submit). The job fails with the rule's code; no call is made."""
    claimed = _make_room(deps, job_id, started.claimed, held)
    try:
        request = _request_from(claimed)
        deps.validate(request)
    except (InputError, NotFoundError) as err:
        refused = err

        def refuse() -> None:
            with deps.transaction() as conn:
                refuse_start(
                    conn, job_id, started.number, deps.clock(), refused.code, refused.message
                )

        _with_db(deps, refuse, job_id=job_id, claimed=True)
        return _refused(job_id, err)
    info = _JobInfo(
        age_from=claimed.started_at,
        attempts=started.attempts,
        portrait=claimed.portrait,
        tenant=claimed.tenant,
        quota_turn_at=claimed.quota_turn_at,
        sides_identical=same_image(
            claimed.front_url, claimed.front_image_id, claimed.back_url, claimed.back_image_id
        ),
    )
    return _Started(request, info, started.number)


def _make_room(
    deps: PipelineDeps, job_id: uuid.UUID, claimed: job_sql.Claimed, held: Held
) -> job_sql.Claimed:
    """Hold the job's share of the process's memory budget: what its images and their
    request body take. Images the claim left out are read once there is room; while it
    waits, the job's lease is renewed (waiting for memory never fails a job)."""
    sides = (
        (claimed.front_image_id, claimed.front_data, claimed.front_size),
        (claimed.back_image_id, claimed.back_data, claimed.back_size),
    )
    weight = held_bytes(sum(size for _, _, size in sides if size is not None))
    missing = [
        image_id
        for image_id, data, size in sides
        if image_id is not None and data is None and size is not None
    ]
    if not missing and weight <= held.bytes:
        held.shrink_to(weight)
        return claimed
    # Give back the claim's reservation first: two large jobs each holding one while
    # waiting for more could wait for each other.
    held.release()
    waited = False

    def renew() -> None:
        nonlocal waited
        waited = True
        _renew_lease(deps, job_id)

    held.take(weight, on_wait=renew, tick_s=max(0.5, deps.settings.lease_s / 3))
    if waited:
        _renew_lease(deps, job_id)  # the call's full lease from now
    if not missing:
        return claimed

    def load() -> dict[uuid.UUID, bytes]:
        with deps.transaction() as conn:
            return job_sql.load_images(conn, missing, deps.sealer)

    loaded = _with_db(deps, load, job_id=job_id, claimed=True)
    return replace(
        claimed,
        front_data=claimed.front_data or loaded.get(claimed.front_image_id),  # type: ignore[arg-type]
        back_data=claimed.back_data or loaded.get(claimed.back_image_id),  # type: ignore[arg-type]
    )


def _renew_lease(deps: PipelineDeps, job_id: uuid.UUID) -> None:
    def write() -> None:
        with deps.transaction() as conn:
            job_sql.renew_lease(conn, job_id, lease_until=_call_lease_until(deps, deps.clock()))

    _with_db(deps, write, job_id=job_id, claimed=True)


def _refused(job_id: uuid.UUID, err: InputError | NotFoundError) -> Outcome:
    log.warning("job_failed", job_id=str(job_id), error_code=err.code, api_calls=0)
    metrics.job_finished(JobStatus.failed.value)
    return Outcome.failed


def _call_lease_until(deps: PipelineDeps, now: datetime) -> datetime:
    # Over the longest quota wait plus the call: a live job's lease never expires under it.
    return now + timedelta(seconds=deps.settings.lease_s + deps.settings.max_quota_wait_s)


# -- step 3: the gate and the call, on the event loop


def _pause_delay_s(deps: PipelineDeps, since: datetime) -> float:
    """How long a job waits out an account pause. It grows with the pause (a billing problem
    can last hours; a large backlog must not cycle through the database every probe
    interval), capped so work resumes within minutes of the probe closing the circuit."""
    interval = deps.settings.circuit_probe_interval_s
    age_s = max(0.0, (deps.clock() - since).total_seconds())
    base = max(interval, min(age_s, PAUSE_DEFER_MAX_S))
    return deps.rng.uniform(base, 1.5 * base)


def quota_return_lead_s(settings: Settings) -> float:
    """How long before its quota turn a deferred job is due again: one sweep interval (the
    sweeper publishes due jobs once per interval) plus QUOTA_RETURN_MARGIN_S, and never more
    than half the job's in-process wait, which must still cover the rest."""
    return min(settings.sweep_interval_s + QUOTA_RETURN_MARGIN_S, settings.max_quota_wait_s / 2)


async def _gate(
    deps: PipelineDeps, *, max_wait_s: float, holds_probe: bool, newcomer: bool
) -> _Gate:
    probe = holds_probe
    try:
        if not holds_probe:
            pause = await deps.circuit.pause()
            if pause is not None:
                if not await deps.circuit.claim_probe(deps.settings.circuit_probe_interval_s):
                    delay = _pause_delay_s(deps, pause.since)
                    return _Gate(granted=False, delay_s=delay, reason="account_paused")
                probe = True
        # wait_s counts from when we asked, the round trip to the shared limiter included
        # (worker.quota.horizon: the latest the slot can be, so the call never leaves before
        # it); our resumption after the reply can lag on a busy CPU, and counting from before
        # the request keeps that lag from shifting the call further.
        asked_at = time.monotonic()
        reservation = await deps.limiter.reserve(
            deps.limiter_key, max_wait_s=max_wait_s, newcomer=newcomer
        )
    except StateUnavailable:
        delay = deps.rng.uniform(STATE_UNAVAILABLE_DEFER_S, 2 * STATE_UNAVAILABLE_DEFER_S)
        return _Gate(granted=False, delay_s=delay, reason="state_unavailable")
    if not reservation.granted:
        # Our turn in the fleet's line is wait_s away (the limiter counted every job of the
        # fleet waiting before us). Come back just before it and wait for it as a holder of
        # our place: the line's order, not a guess, spreads the returns; early enough that
        # the sweeper's interval never lets the line run dry.
        delay = max(0.0, reservation.wait_s - quota_return_lead_s(deps.settings))
        return _Gate(granted=False, delay_s=delay, reason="quota", turn_s=reservation.wait_s)
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
    deps: PipelineDeps,
    request: OcrRequest,
    *,
    window_ends: float,
    holds_probe: bool,
    turn_at: datetime | None = None,
    newcomer: bool = True,
) -> _Gate | _Call:
    """Circuit, slot, sleep, call: one coroutine, so nothing but the loop's own wake-up
    stands between the slot the limiter gave and the request leaving.

    `turn_at`: the quota turn a deferred job holds; it sleeps until the turn is within the
    booking horizon, then asks as a holder. `newcomer`: the job has no place in the line.

    If the loop wakes so late that the call would leave its slot (a starved CPU), the slot
    is given up and a fresh one taken: a wasted slot costs a little throughput, a call in
    the wrong window costs a throttle."""
    if turn_at is not None:
        newcomer = False
        until_turn_s = (turn_at - deps.clock()).total_seconds() - deps.settings.quota_horizon_s
        pause_s = min(until_turn_s, window_ends - time.monotonic())
        if pause_s > 0:
            await asyncio.sleep(pause_s)
    missed = 0
    while True:
        max_wait_s = max(0.0, window_ends - time.monotonic())
        gate = await _gate(deps, max_wait_s=max_wait_s, holds_probe=holds_probe, newcomer=newcomer)
        newcomer = False
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
    undecodable: AnswerUndecodable | None = None
    try:
        async with asyncio.timeout(deps.settings.total_timeout_s + CALL_GUARD_S):
            result = await deps.client.recognize(request)
    except ApiError as err:
        error = err
    except InputError as err:
        input_error = err
    except AnswerUndecodable as err:
        undecodable = err
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
        undecodable=undecodable,
        slot_late_ms=slot_late_ms,
    )


def _open_attempt(deps: PipelineDeps, job_id: uuid.UUID, number: int) -> None:
    """Open attempt `number` after a throttle or a re-sign, in its own transaction.

    Inserted BEFORE reserving a slot, so no SQL sits between the slot and the call (the
    quota's margin is tens of milliseconds); a SIGKILL leaves the row open for the sweeper
    to close as WorkerLost. We hold the job's lease, so the number after ours is free."""
    now = deps.clock()
    with deps.transaction() as conn:
        job_sql.insert_attempt(conn, job_id, number, now=now, host=deps.worker_host)
        job_sql.count_call(conn, job_id, lease_until=_call_lease_until(deps, now))


def _record(call: _Call) -> job_sql.CallRecord:
    return job_sql.CallRecord(
        started_at=call.started_at,
        finished_at=call.finished_at,
        code=call.code,
        message=_message(call),
        request_id=call.request_id,
        latency_ms=call.latency_ms,
    )


def _close_attempt(conn: Connection, job_id: uuid.UUID, number: int, call: _Call) -> None:
    job_sql.close_attempt(conn, job_id, number, _record(call))


# -- step 4: outcomes, each one transaction


def _record_and_defer(
    deps: PipelineDeps,
    job_id: uuid.UUID,
    *,
    delay_s: float,
    number: int | None = None,
    call: _Call | None = None,
    error: ApiError | None = None,
    drop: int | None = None,
    turn_s: float | None = None,
) -> None:
    """Put the job back to wait without spending budget (quota, pause, Redis down).
    `drop`: an attempt row opened for a call that did not happen. `turn_s`: deferred for
    quota, the turn it holds in the fleet's line, seconds from now."""
    now = deps.clock()
    next_at = now + timedelta(seconds=max(0.0, delay_s))
    turn_at = None if turn_s is None else now + timedelta(seconds=turn_s)

    def write() -> None:
        with deps.transaction() as conn:
            if number is not None and call is not None:
                _close_attempt(conn, job_id, number, call)
            if drop is not None:
                job_sql.drop_attempt(conn, job_id, drop)
            if error is not None:
                job_sql.schedule_retry(conn, job_id, next_at, error.code, error.message)
            else:
                job_sql.defer(conn, job_id, next_at, turn_at)

    _with_db(deps, write, job_id=job_id, claimed=True)


def _record_only(deps: PipelineDeps, job_id: uuid.UUID, number: int, call: _Call) -> None:
    """Close an attempt whose outcome leaves the job running (throttle, re-sign)."""

    def write() -> None:
        with deps.transaction() as conn:
            _close_attempt(conn, job_id, number, call)
            job_sql.set_last_error(conn, job_id, call.code, _message(call))

    _with_db(deps, write, job_id=job_id, claimed=True)


def _message(call: _Call) -> str | None:
    if call.error is not None:
        return call.error.message
    return call.input_error.message if call.input_error is not None else None


def _decide(
    deps: PipelineDeps, job_id: uuid.UUID, result: OcrResult, info: _JobInfo, read_at: datetime
) -> Decision | None:
    """The tenant's decision on the answer; None (stored undecided, for `macao-ocr decide`)
    if it cannot be made, because a bought result is never lost to a decision."""
    try:
        if deps.policies is not None:
            policy = deps.policies(info.tenant)
        else:
            policy = policy_for(info.tenant, None, deps.settings.warning_policy_overrides)
        return decide_answer(
            result,
            policy,
            sides_identical=info.sides_identical,
            read_at=read_at,
            limits=limits_of(deps.settings),
        )
    except Exception as err:
        if _db_unavailable(err):
            raise  # the policy could not be read: ridden out with the write
        log.error("decision_failed", job_id=str(job_id), error_type=type(err).__name__)
        return None


def _finalize_success(
    deps: PipelineDeps, job_id: uuid.UUID, number: int, call: _Call, info: _JobInfo
) -> Decision | None:
    """Decision, then result + warnings + reasons + portrait + job succeeded, in ONE
    transaction. A database outage here is ridden out in memory (the result is never bought
    twice)."""
    result = call.result
    assert result is not None
    decided: list[Decision | None] = []

    def write() -> None:
        decision = _decide(deps, job_id, result, info, call.finished_at)
        decided[:] = [decision]
        try:
            with (deps.statement or deps.transaction)() as conn:
                job_sql.store_success(
                    conn,
                    job_id,
                    number,
                    _record(call),
                    result,
                    info.portrait,
                    decision,
                    sealer=deps.sealer,
                )
        except exc.IntegrityError:
            # A result is already stored: our own commit that went through before the
            # connection dropped, or another run that took over an expired lease. A result
            # is only ever written with its job marked succeeded, so just record our call.
            with deps.transaction() as conn:
                if not job_sql.has_result(conn, job_id):
                    raise
                _close_attempt(conn, job_id, number, call)
            log.warning("result_already_stored", job_id=str(job_id), attempt=number)
            decided[:] = [None]

    _with_db(deps, write, job_id=job_id, claimed=True)
    return decided[0] if decided else None


def _poison(
    deps: PipelineDeps,
    job_id: uuid.UUID,
    number: int,
    call: _Call,
    error: StoreFailed,
    answer: Mapping[str, Any] | None,
    holds_probe: bool,
) -> Outcome:
    """The API answered but the answer could not be decoded or stored: fail the job at once
    with Internal.StoreFailed and keep the answer for a replay (worker.store.kept). Left to
    the lease instead, the sweeper would buy the job again after every lease."""
    now = deps.clock()
    record = replace(_record(call), message=error.message)

    def keep() -> None:
        with deps.transaction() as conn:
            kept.fail_keeping_answer(
                conn,
                job_id,
                number,
                record,
                answer=answer,
                error=error,
                now=now,
                sealer=deps.sealer,
            )

    kept_it = answer is not None
    try:
        _with_db(deps, keep, job_id=job_id, claimed=True)
    except DatabaseUnavailable:
        raise
    except Exception as err:
        # Not even the answer can be written: fail the job without it rather than buy it
        # again on every lease (a replay then makes a new call).
        kept_it = False
        lost = StoreFailed(error.stage, error.reason)
        lost.message = (
            f"the API's answer could not be {error.stage}d ({error.reason}) nor kept "
            f"({type(err).__name__}); a replay makes a new call"
        )

        def fail() -> None:
            with deps.transaction() as conn:
                kept.fail_keeping_answer(
                    conn,
                    job_id,
                    number,
                    record,
                    answer=None,
                    error=lost,
                    now=now,
                    sealer=deps.sealer,
                )

        _with_db(deps, fail, job_id=job_id, claimed=True)
    log.error(
        "job_store_failed",
        job_id=str(job_id),
        error_code=error.code,
        stage=error.stage,
        reason=error.reason,
        answer_kept=kept_it,
        attempt=number,
        request_id=call.request_id,
    )
    metrics.job_finished(JobStatus.failed.value)
    if holds_probe:
        # The account answered a success: the pause is over whatever became of the answer.
        _resume_account(deps, job_id)
    return Outcome.failed


def _finalize_failure(
    deps: PipelineDeps,
    job_id: uuid.UUID,
    number: int,
    call: _Call,
    info: _JobInfo,
    *,
    give_up: bool = False,
) -> Outcome:
    """A budget-spending failure: retry later (scheduled in the database) or dead-letter
    (at once with `give_up`: a budget of its own is spent)."""
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
    give_up = give_up or isinstance(error, PermanentError) or attempts >= limit or too_old
    delay_s = 0.0
    if not give_up:
        delay_s = full_jitter_s(
            attempts,
            base_s=deps.settings.backoff_base_s,
            max_s=deps.settings.backoff_max_s,
            rng=deps.rng,
        )

    def write() -> None:
        with deps.transaction() as conn:
            _close_attempt(conn, job_id, number, call)
            job_sql.spend(conn, job_id)
            if give_up:
                job_sql.mark_failed(conn, job_id, now, error.code, error.message)
            else:
                next_at = now + timedelta(seconds=delay_s)
                job_sql.schedule_retry(conn, job_id, next_at, error.code, error.message)

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
        with deps.transaction() as conn:
            job_sql.drop_attempt(conn, job_id, number)
            job_sql.mark_failed(conn, job_id, deps.clock(), err.code, err.message)

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
    admission = deps.admission
    if admission is not None:
        # Before the claim: a job that cannot be served soon stays in the broker's queue.
        admission.enter()
    held = Held(deps.memory)
    try:
        inline_max = job_sql.NO_INLINE_LIMIT
        if deps.memory is not None:
            # Room for the images the claim may bring, before it brings them.
            inline_max = deps.memory.inline_max_bytes
            held.take(held_bytes(2 * inline_max))
        # Nothing of the start holds unless all of it commits: not claimed on a database error.
        started = _with_db(deps, lambda: _start(deps, jid, inline_max), job_id=jid, claimed=False)
        if isinstance(started, Outcome):
            if started is Outcome.not_claimed:
                log.debug("job_not_claimed", job_id=str(jid))
            elif started is Outcome.already_succeeded:
                log.info("job_already_succeeded", job_id=str(jid))
            elif started is Outcome.failed:
                log.warning("job_failed", job_id=str(jid), error_code=WorkerLostError.CODE)
                metrics.job_finished(JobStatus.failed.value)
            return started
        prepared = _prepare(deps, jid, started, held)
        if isinstance(prepared, Outcome):
            return prepared
        return _call_loop(deps, jid, prepared)
    finally:
        held.release()
        if admission is not None:
            admission.leave()


def _call_loop(deps: PipelineDeps, job_id: uuid.UUID, started: _Started) -> Outcome:
    settings = deps.settings
    request, info = started.request, started.info
    # Throttled answers are retried here, all within one quota-wait window; past it, defer.
    window_ends = time.monotonic() + settings.max_quota_wait_s
    resigned = False
    holds_probe = False
    number = started.number
    first = True
    first_pass = True
    fallback_used = False
    while True:
        if not first:
            number += 1
            _with_db(
                deps, partial(_open_attempt, deps, job_id, number), job_id=job_id, claimed=True
            )
        first = False
        outcome = deps.run(
            _gate_and_send(
                deps,
                request,
                window_ends=window_ends,
                holds_probe=holds_probe,
                # Only the first pass: a throttled or re-signed call asks again at once.
                turn_at=info.quota_turn_at if first_pass else None,
                newcomer=first_pass,
            )
        )
        first_pass = False
        if isinstance(outcome, _Gate):
            _record_and_defer(
                deps, job_id, delay_s=outcome.delay_s, drop=number, turn_s=outcome.turn_s
            )
            log.info(
                "job_deferred",
                job_id=str(job_id),
                reason=outcome.reason,
                delay_s=round(outcome.delay_s, 3),
            )
            return Outcome.deferred
        call = outcome
        holds_probe = call.probe
        if deps.admission is not None:
            deps.admission.granted()
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

        if call.undecodable is not None:
            bad = call.undecodable
            return _poison(deps, job_id, number, call, bad, bad.answer, holds_probe)
        if call.result is not None:
            try:
                decision = _finalize_success(deps, job_id, number, call, info)
            except DatabaseUnavailable:
                raise
            except Exception as err:
                # After the API answered nothing may buy the job again (see _poison).
                failed = StoreFailed("store", type(err).__name__)
                return _poison(deps, job_id, number, call, failed, call.result.answer, holds_probe)
            log.info(
                "job_succeeded",
                job_id=str(job_id),
                attempt=number,
                decision=None if decision is None else decision.outcome.value,
            )
            metrics.job_finished(JobStatus.succeeded.value)
            if decision is not None:
                metrics.decided(decision.outcome.value, [r.code for r in decision.reasons])
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
        if error.code == fallback_sql.DOWNLOAD_ERROR:
            after = _download_error(deps, job_id, number, call, info, request, fallback_used)
            if isinstance(after, Outcome):
                return after
            request, fallback_used = after, True
            continue
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


def _download_error(
    deps: PipelineDeps,
    job_id: uuid.UUID,
    number: int,
    call: _Call,
    info: _JobInfo,
    request: OcrRequest,
    fallback_used: bool,
) -> OcrRequest | Outcome:
    """DownLoadError has a budget of its own (`download_max_attempts`). Once it is spent,
    with `url_fallback` on, the worker fetches the URL itself and the next call (made by
    the caller's loop) sends the image inline, once; else the job fails."""
    settings = deps.settings

    def read() -> tuple[int, bool]:
        with deps.transaction() as conn:
            return fallback_sql.download_errors(conn, job_id), fallback_sql.fallback_used(
                conn, job_id
            )

    earlier, used = _with_db(deps, read, job_id=job_id, claimed=True)
    if earlier + 1 < settings.download_max_attempts:
        return _finalize_failure(deps, job_id, number, call, info)
    if not settings.url_fallback or used or fallback_used or not url_fallback.has_url(request):
        return _finalize_failure(deps, job_id, number, call, info, give_up=True)
    error = call.error
    assert error is not None
    try:
        inline = url_fallback.fetch_inline(deps.run, request, settings)
    except InputError as err:
        log.warning("url_fallback_refused", job_id=str(job_id), rule=err.rule, attempt=number)
        refused = TransientError(
            error.code, f"{error.message}; {err.message}", request_id=error.request_id
        )
        return _finalize_failure(
            deps, job_id, number, replace(call, error=refused), info, give_up=True
        )
    reason = (
        f"{earlier + 1} DownLoadError answers: the worker fetched the image URL itself "
        "and sends it inline once"
    )

    def write() -> None:
        with deps.transaction() as conn:
            _close_attempt(conn, job_id, number, call)
            job_sql.spend(conn, job_id)
            job_sql.set_last_error(conn, job_id, error.code, error.message)
            fallback_sql.record_fallback(conn, job_id, deps.clock(), reason)

    _with_db(deps, write, job_id=job_id, claimed=True)
    info.attempts += 1
    log.info("url_fallback_used", job_id=str(job_id), attempt=number)
    metrics.retry(error.code)
    return inline


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
