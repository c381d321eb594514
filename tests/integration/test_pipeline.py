"""The job state machine without Celery: a fake OCR client, the in-memory limiter, a fake
circuit, on a migrated PostgreSQL database (rolled back after each test)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Connection, event, exc, select
from sqlalchemy.orm import Session, sessionmaker

from models import Attempt, Job, JobStatus, Portrait, Result, Warning
from models.base import utcnow
from tests.fixtures.workers import sealed_job, sealer_for_tests
from worker.errors import (
    AccountError,
    ApiError,
    PermanentError,
    ResignError,
    StateUnavailable,
    ThrottledError,
    TransientError,
    TransportError,
    UnknownCodeError,
)
from worker.pipeline import Outcome, PipelineDeps, process_job, quota_return_lead_s
from worker.quota.circuit import Pause
from worker.quota.limiter import Reservation
from worker.quota.limiter_memory import MemoryRateLimiter
from worker.runtime import LoopThread
from worker.settings import Settings
from worker.store.engine import make_autocommit_engine, make_engine
from worker.tencent.types import CardWarning, OcrRequest, OcrResult

KEY = "macao-ocr:quota:test"


# -- fakes


@dataclass
class FakeClient:
    """Answers each recognize() with the next scripted outcome (an OcrResult or an ApiError)."""

    script: list[OcrResult | ApiError] = field(default_factory=list)
    calls: list[OcrRequest] = field(default_factory=list)
    during_call: Callable[[], None] | None = None

    async def recognize(self, request: OcrRequest) -> OcrResult:
        self.calls.append(request)
        if self.during_call is not None:
            self.during_call()
        outcome = self.script.pop(0) if self.script else ok_result()
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome


@dataclass
class FakeCircuit:
    paused: Pause | None = None
    probe_available: bool = False
    opened: list[str] = field(default_factory=list)
    closes: int = 0
    down: bool = False

    async def pause(self) -> Pause | None:
        if self.down:
            raise StateUnavailable("redis down")
        return self.paused

    async def open(self, code: str, message: str) -> bool:
        self.opened.append(code)
        if self.paused is not None:
            return False
        self.paused = Pause(code=code, message=message, since=utcnow())
        return True

    async def close(self) -> None:
        self.paused = None
        self.closes += 1

    async def claim_probe(self, interval_s: float) -> bool:
        granted, self.probe_available = self.probe_available, False
        return granted


@dataclass
class SpyLimiter:
    """The memory limiter, counting throttles; `refuse_s` plays a quota queue too long."""

    inner: MemoryRateLimiter = field(default_factory=lambda: MemoryRateLimiter(qps=0))
    throttles: int = 0
    reserves: int = 0
    refuse_s: float | None = None
    down: bool = False
    # (newcomer, time.monotonic()) of every ask.
    asks: list[tuple[bool, float]] = field(default_factory=list)

    async def reserve(self, key: str, *, max_wait_s: float, newcomer: bool = False) -> Reservation:
        if self.down:
            raise StateUnavailable("redis down")
        self.reserves += 1
        self.asks.append((newcomer, time.monotonic()))
        if self.refuse_s is not None:
            return Reservation(granted=False, wait_s=self.refuse_s)
        return await self.inner.reserve(key, max_wait_s=max_wait_s)

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        self.throttles += 1
        return await self.inner.throttled(key, window=window, window_cap=window_cap)

    async def effective_rate(self, key: str) -> float:
        return await self.inner.effective_rate(key)


def ok_result(request_id: str = "req-ok") -> OcrResult:
    return OcrResult(
        request_id=request_id,
        cn_last_name="陳",
        en_last_name="CHAN",
        last_name_code="7115",
        cn_first_name="大文",
        en_first_name="TAI MAN",
        first_name_code="1129 2429",
        id_number="1234567(8)",
        birthday=date(1990, 5, 17),
        sex="男 M",
        first_issue_date=date(2008, 1, 2),
        current_issue_date=date(2018, 3, 4),
        validity_period=date(2028, 3, 4),
        validity_period_text="04-03-2028",
        symbol="ASM",
        height_m=Decimal("1.64"),
        angle=0.5,
        resident_type="Permanent Resident Identity Card",
        portrait=b"\xff\xd8portrait",
        warnings=(CardWarning(-9102, "photocopy"), CardWarning(-9107, "glare")),
    )


def transient(code: str = "FailedOperation.OcrFailed") -> TransientError:
    return TransientError(code, "ocr failed", request_id="req-t")


# -- fixtures


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread(name="test-pipeline-loop")
    yield loop
    loop.stop()


@pytest.fixture
def settings() -> Settings:
    return Settings(
        database_url="postgresql://unused/db",
        qps=0,
        max_attempts=3,
        unknown_code_max_attempts=2,
        backoff_base_s=2.0,
        backoff_max_s=300.0,
        max_quota_wait_s=5.0,
        circuit_probe_interval_s=30.0,
        lease_s=120.0,
        db_write_retry_s=30.0,
        max_age_s=3600.0,
    )


@dataclass
class Harness:
    deps: PipelineDeps
    client: FakeClient
    limiter: SpyLimiter
    circuit: FakeCircuit
    sessions: sessionmaker[Session]
    sleeps: list[float]

    def add_job(self, **values: Any) -> uuid.UUID:
        values.setdefault("front_url", "https://cards.example.com/front.jpg")
        job = sealed_job(**values)
        with self.sessions() as session, session.begin():
            session.add(job)
        return job.id

    def job(self, job_id: uuid.UUID) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def attempts(self, job_id: uuid.UUID) -> list[Attempt]:
        with self.sessions() as session:
            rows = list(
                session.scalars(
                    select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
                )
            )
            session.expunge_all()
            return rows

    def run(self, job_id: uuid.UUID | str) -> Outcome:
        return process_job(str(job_id), self.deps)


@pytest.fixture(params=["one-statement", "transaction-only"])
def harness(
    request: pytest.FixtureRequest,
    session_factory: sessionmaker[Session],
    transactions: Callable[[], AbstractContextManager[Connection]],
    settings: Settings,
    loop_thread: LoopThread,
) -> Harness:
    """Each test runs both ways a worker may: plain starts and successes as single
    statements (PostgreSQL's worker), and everything in transactions (what SQLite gets)."""
    client = FakeClient()
    limiter = SpyLimiter()
    circuit = FakeCircuit()
    sleeps: list[float] = []
    deps = PipelineDeps(
        settings=settings,
        transaction=transactions,
        client=client,
        limiter=limiter,
        circuit=circuit,
        limiter_key=KEY,
        run=loop_thread.run,
        worker_host="test-host",
        sleep=sleeps.append,
        rng=random.Random(7),
        statement=transactions if request.param == "one-statement" else None,
        sealer=sealer_for_tests(),
    )
    return Harness(deps, client, limiter, circuit, session_factory, sleeps)


# -- success


def test_success_stores_result_warnings_and_portrait(harness: Harness) -> None:
    job_id = harness.add_job(portrait=True)
    assert harness.run(job_id) is Outcome.succeeded

    assert len(harness.client.calls) == 1
    assert harness.client.calls[0].portrait is True
    job = harness.job(job_id)
    assert job.status is JobStatus.succeeded
    assert job.attempts == 1 and job.api_calls == 1
    assert job.finished_at is not None and job.lease_expires_at is None
    assert job.worker_host == "test-host"
    with harness.sessions() as session:
        row = session.get(Result, job_id)
        assert row is not None
        result = sealer_for_tests().open_result(row)
        expected = ok_result()
        for name in ("request_id", "cn_last_name", "en_first_name", "id_number", "birthday"):
            assert getattr(result, name) == getattr(expected, name)
        assert result.height_m == Decimal("1.64")
        assert result.validity_period == date(2028, 3, 4)
        warnings = session.scalars(select(Warning).where(Warning.job_id == job_id)).all()
        assert sorted((w.code, w.name) for w in warnings) == [
            (-9107, "glare"),
            (-9102, "photocopy"),
        ]
        portrait = session.get(Portrait, job_id)
        assert portrait is not None
        assert sealer_for_tests().open_portrait(job_id, portrait.data) == b"\xff\xd8portrait"
    [attempt] = harness.attempts(job_id)
    assert attempt.number == 1 and attempt.outcome_code == "OK"
    assert attempt.request_id == "req-ok" and attempt.finished_at is not None
    assert attempt.latency_ms is not None and attempt.latency_ms >= 0
    assert attempt.worker_host == "test-host"


def test_portrait_not_stored_unless_asked(harness: Harness) -> None:
    job_id = harness.add_job(portrait=False)
    assert harness.run(job_id) is Outcome.succeeded
    with harness.sessions() as session:
        assert session.get(Portrait, job_id) is None


def test_a_plain_job_is_two_statements_with_no_transaction_around_them(
    fresh_migrated_database: Callable[[], str], settings: Settings, loop_thread: LoopThread
) -> None:
    # What a worker on PostgreSQL runs: the claim that opens the attempt, then the success
    # (result, warnings, portrait, attempt, job), each committing on its own, so no BEGIN and
    # COMMIT round trips; the transactions fixture cannot show this, a real engine can.
    db_settings = Settings(database_url=fresh_migrated_database())
    engine = make_engine(db_settings, pool_pre_ping=False)
    autocommit = make_autocommit_engine(db_settings, pool_pre_ping=False)
    assert autocommit is not None
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            job = sealed_job(front_url="https://cards.example.com/front.jpg", portrait=True)
            session.add(job)
        statements: list[tuple[str, bool]] = []

        @event.listens_for(autocommit, "before_cursor_execute")
        @event.listens_for(engine, "before_cursor_execute")
        def spy(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            statements.append((statement.split(None, 1)[0], cursor.connection.autocommit))

        deps = PipelineDeps(
            settings=settings,
            transaction=engine.begin,
            statement=autocommit.begin,
            client=FakeClient(),
            limiter=SpyLimiter(),
            circuit=FakeCircuit(),
            limiter_key=KEY,
            run=loop_thread.run,
            sealer=sealer_for_tests(),
        )
        assert process_job(str(job.id), deps) is Outcome.succeeded
        assert statements == [("WITH", True), ("WITH", True)]
        with Session(engine) as session:
            stored = session.get(Job, job.id)
            assert stored is not None and stored.status is JobStatus.succeeded
            assert (stored.attempts, stored.api_calls) == (1, 1)
            assert session.get(Result, job.id) is not None
            assert len(session.scalars(select(Warning).where(Warning.job_id == job.id)).all()) == 2
            portrait = session.get(Portrait, job.id)
            assert portrait is not None
            assert sealer_for_tests().open_portrait(job.id, portrait.data) == b"\xff\xd8portrait"
            [attempt] = session.scalars(select(Attempt).where(Attempt.job_id == job.id)).all()
            assert attempt.outcome_code == "OK" and attempt.finished_at is not None
        # A second delivery of the message: the plain claim finds nothing, the full one
        # (in a transaction) finds the job done and leaves it alone.
        assert process_job(str(job.id), deps) is Outcome.not_claimed
    finally:
        engine.dispose()
        autocommit.dispose()


# -- claim semantics


def test_duplicate_message_does_nothing(harness: Harness) -> None:
    job_id = harness.add_job()
    assert harness.run(job_id) is Outcome.succeeded
    assert harness.run(job_id) is Outcome.not_claimed
    assert len(harness.client.calls) == 1
    assert len(harness.attempts(job_id)) == 1


def test_job_with_a_result_is_never_bought_twice(harness: Harness) -> None:
    # A crash after finalize but before the ack: the message comes back, the job is running
    # with an expired lease, and the result is already stored.
    job_id = harness.add_job(
        status=JobStatus.running, lease_expires_at=utcnow() - timedelta(seconds=5)
    )
    with harness.sessions() as session, session.begin():
        session.add(Result(job_id=job_id, request_id="earlier"))
    assert harness.run(job_id) is Outcome.already_succeeded
    assert harness.client.calls == []
    job = harness.job(job_id)
    assert job.status is JobStatus.succeeded and job.finished_at is not None


def test_retrying_job_not_yet_due_is_left_alone(harness: Harness) -> None:
    due = utcnow() + timedelta(hours=1)
    job_id = harness.add_job(status=JobStatus.retrying, next_attempt_at=due, attempts=1)
    assert harness.run(job_id) is Outcome.not_claimed
    assert harness.client.calls == []
    job = harness.job(job_id)
    assert job.status is JobStatus.retrying and job.next_attempt_at == due


def test_running_job_with_a_live_lease_is_left_alone(harness: Harness) -> None:
    job_id = harness.add_job(
        status=JobStatus.running, lease_expires_at=utcnow() + timedelta(minutes=1)
    )
    assert harness.run(job_id) is Outcome.not_claimed
    assert harness.client.calls == []


def test_expired_lease_is_reclaimed_and_the_lost_attempt_closed(harness: Harness) -> None:
    job_id = harness.add_job(
        status=JobStatus.running,
        lease_expires_at=utcnow() - timedelta(seconds=1),
        api_calls=1,
    )
    with harness.sessions() as session, session.begin():
        session.add(Attempt(job_id=job_id, number=1, worker_host="dead-host"))
    assert harness.run(job_id) is Outcome.succeeded
    first, second = harness.attempts(job_id)
    assert first.outcome_code == "WorkerLost" and first.finished_at is not None
    assert second.number == 2 and second.outcome_code == "OK"
    job = harness.job(job_id)
    assert job.status is JobStatus.succeeded
    assert job.attempts == 2 and job.api_calls == 2


def test_failed_job_is_terminal(harness: Harness) -> None:
    job_id = harness.add_job(status=JobStatus.failed, last_error_code="X")
    assert harness.run(job_id) is Outcome.not_claimed
    assert harness.client.calls == []


def test_malformed_job_id_is_dropped(harness: Harness) -> None:
    assert harness.run("not-a-uuid") is Outcome.not_claimed
    assert harness.run(uuid.uuid4()) is Outcome.not_claimed
    assert harness.client.calls == []


# -- failures


def test_transient_error_schedules_a_retry_within_backoff_bounds(harness: Harness) -> None:
    job_id = harness.add_job(attempts=1)  # the 2nd failure: cap = base * 2 = 4 s
    harness.client.script = [transient()]
    before = utcnow()
    assert harness.run(job_id) is Outcome.retrying
    after = utcnow()
    job = harness.job(job_id)
    assert job.status is JobStatus.retrying
    assert job.attempts == 2 and job.api_calls == 1
    assert job.last_error_code == "FailedOperation.OcrFailed"
    assert job.lease_expires_at is None
    assert job.next_attempt_at is not None
    assert before <= job.next_attempt_at <= after + timedelta(seconds=4.0)
    [attempt] = harness.attempts(job_id)
    assert attempt.outcome_code == "FailedOperation.OcrFailed"
    assert attempt.request_id == "req-t" and attempt.message == "ocr failed"


def test_retry_delays_use_full_jitter_across_the_interval(harness: Harness) -> None:
    delays = []
    for _ in range(12):
        job_id = harness.add_job()
        harness.client.script = [transient()]
        before = utcnow()
        assert harness.run(job_id) is Outcome.retrying
        next_at = harness.job(job_id).next_attempt_at
        assert next_at is not None
        delays.append((next_at - before).total_seconds())
    assert all(-0.5 <= d <= 2.5 for d in delays)  # first failure: cap = base = 2 s
    assert len({round(d, 3) for d in delays}) > 6  # jittered, not a constant


def test_due_retry_runs_again_and_succeeds(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [transient()]
    assert harness.run(job_id) is Outcome.retrying
    with harness.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.next_attempt_at = utcnow() - timedelta(seconds=1)
    assert harness.run(job_id) is Outcome.succeeded
    assert [a.outcome_code for a in harness.attempts(job_id)] == ["FailedOperation.OcrFailed", "OK"]
    job = harness.job(job_id)
    assert job.attempts == 2 and job.api_calls == 2


def test_exhausted_budget_fails_the_job_with_the_code(harness: Harness) -> None:
    job_id = harness.add_job(attempts=2)  # max_attempts=3
    harness.client.script = [TransportError("Transport.HTTP502", "bad gateway")]
    assert harness.run(job_id) is Outcome.failed
    job = harness.job(job_id)
    assert job.status is JobStatus.failed
    assert job.last_error_code == "Transport.HTTP502"
    assert job.last_error_message == "bad gateway"
    assert job.attempts == 3 and job.finished_at is not None and job.next_attempt_at is None


def test_unknown_code_has_a_smaller_budget(harness: Harness) -> None:
    job_id = harness.add_job(attempts=1)  # unknown_code_max_attempts=2
    harness.client.script = [UnknownCodeError("FailedOperation.Brand.New", "?")]
    assert harness.run(job_id) is Outcome.failed
    assert harness.job(job_id).last_error_code == "FailedOperation.Brand.New"


def test_too_old_job_fails_instead_of_retrying(harness: Harness) -> None:
    two_hours_ago = utcnow() - timedelta(hours=2)  # max_age 1 h
    job_id = harness.add_job(
        created_at=two_hours_ago, started_at=two_hours_ago, status=JobStatus.retrying
    )
    harness.client.script = [transient()]
    assert harness.run(job_id) is Outcome.failed
    assert harness.job(job_id).attempts == 1


def test_a_replayed_old_job_gets_a_fresh_age_budget(harness: Harness) -> None:
    """Replay clears started_at: a dead letter from last week is retried, not failed at its
    first transient error for being old."""
    job_id = harness.add_job(created_at=utcnow() - timedelta(days=7))
    harness.client.script = [transient()]
    assert harness.run(job_id) is Outcome.retrying
    assert harness.job(job_id).attempts == 1


def test_permanent_error_fails_after_exactly_one_call(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [PermanentError("FailedOperation.ImageNoSpecifiedCard", "no card")]
    assert harness.run(job_id) is Outcome.failed
    assert len(harness.client.calls) == 1
    job = harness.job(job_id)
    assert job.status is JobStatus.failed
    assert job.last_error_code == "FailedOperation.ImageNoSpecifiedCard"
    assert job.api_calls == 1 and job.attempts == 1


def test_invalid_stored_input_fails_without_a_call(harness: Harness) -> None:
    job_id = harness.add_job(front_url="ftp://cards.example.com/front.jpg")
    assert harness.run(job_id) is Outcome.failed
    assert harness.client.calls == []
    job = harness.job(job_id)
    assert job.status is JobStatus.failed
    assert job.last_error_code is not None and job.last_error_code.startswith("Input.")
    assert job.api_calls == 0 and harness.attempts(job_id) == []


# -- no-budget outcomes


def test_throttled_call_is_retried_in_task_without_spending_budget(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [
        ThrottledError("RequestLimitExceeded", "slow down"),
        ThrottledError("RequestLimitExceeded", "slow down"),
    ]
    assert harness.run(job_id) is Outcome.succeeded
    assert harness.limiter.throttles == 2
    assert harness.limiter.reserves == 3  # every call waited for its own slot
    job = harness.job(job_id)
    assert job.attempts == 1 and job.api_calls == 3
    codes = [a.outcome_code for a in harness.attempts(job_id)]
    assert codes == ["RequestLimitExceeded", "RequestLimitExceeded", "OK"]


def test_quota_too_far_defers_without_calling(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.limiter.refuse_s = 90.0
    before = utcnow()
    assert harness.run(job_id) is Outcome.deferred
    assert harness.client.calls == []
    job = harness.job(job_id)
    assert job.status is JobStatus.retrying and job.attempts == 0 and job.api_calls == 0
    assert job.next_attempt_at is not None and job.quota_turn_at is not None
    # It holds the turn the line gave it, and is due one sweep interval and a margin before
    # it, to wait for it in process (never after it: the line would run dry).
    assert (job.quota_turn_at - before).total_seconds() == pytest.approx(90.0, abs=1.0)
    lead_s = quota_return_lead_s(harness.deps.settings)
    assert lead_s > harness.deps.settings.sweep_interval_s
    assert (job.quota_turn_at - job.next_attempt_at).total_seconds() == pytest.approx(
        lead_s, abs=0.01
    )
    assert harness.limiter.asks[0][0] is True  # it asked as a newcomer
    assert harness.attempts(job_id) == []


def test_a_job_back_for_its_quota_turn_waits_for_it_and_asks_as_its_holder(
    harness: Harness,
) -> None:
    turn_in_s = 0.8
    job_id = harness.add_job(
        status=JobStatus.retrying,
        next_attempt_at=utcnow(),
        quota_turn_at=utcnow() + timedelta(seconds=turn_in_s),
    )
    started = time.monotonic()
    assert harness.run(job_id) is Outcome.succeeded
    [(newcomer, asked_at)] = harness.limiter.asks
    # Not at the back of the line again: it asked as the holder of its place, once its
    # turn was within the booking horizon (not before).
    assert newcomer is False
    horizon_s = harness.deps.settings.quota_horizon_s
    assert asked_at - started >= turn_in_s - horizon_s - 0.05


def test_an_error_retry_has_no_place_in_the_line(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [transient()]
    assert harness.run(job_id) is Outcome.retrying
    assert harness.job(job_id).quota_turn_at is None


def test_redis_unreachable_defers_and_never_calls_blind(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.limiter.down = True
    assert harness.run(job_id) is Outcome.deferred
    harness.limiter.down = False
    harness.circuit.down = True
    job2 = harness.add_job()
    assert harness.run(job2) is Outcome.deferred
    assert harness.client.calls == []
    for jid in (job_id, job2):
        job = harness.job(jid)
        assert job.status is JobStatus.retrying and job.attempts == 0
        assert job.next_attempt_at is not None and job.next_attempt_at > utcnow()


def test_account_error_opens_the_circuit_and_defers(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [AccountError("ResourceUnavailable.InArrears", "in arrears")]
    before = utcnow()
    assert harness.run(job_id) is Outcome.deferred
    assert harness.circuit.opened == ["ResourceUnavailable.InArrears"]
    assert harness.circuit.paused is not None
    job = harness.job(job_id)
    assert job.status is JobStatus.retrying and job.attempts == 0 and job.api_calls == 1
    assert job.last_error_code == "ResourceUnavailable.InArrears"
    assert job.next_attempt_at is not None
    assert (job.next_attempt_at - before).total_seconds() == pytest.approx(30.0, abs=2.0)

    # While paused, other jobs wait without calling (no probe granted).
    other = harness.add_job()
    assert harness.run(other) is Outcome.deferred
    assert len(harness.client.calls) == 1
    assert harness.job(other).attempts == 0

    # The probe: one job may call; its success closes the circuit.
    harness.circuit.probe_available = True
    assert harness.run(other) is Outcome.not_claimed  # not due yet
    with harness.sessions() as session, session.begin():
        row = session.get(Job, other)
        assert row is not None
        row.next_attempt_at = utcnow() - timedelta(seconds=1)
    assert harness.run(other) is Outcome.succeeded
    assert harness.circuit.paused is None and harness.circuit.closes == 1


def test_signature_expired_once_is_signed_again(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [ResignError("AuthFailure.SignatureExpire", "expired")]
    assert harness.run(job_id) is Outcome.succeeded
    assert len(harness.client.calls) == 2
    job = harness.job(job_id)
    assert job.attempts == 1 and job.api_calls == 2
    assert harness.circuit.opened == []


def test_signature_expired_twice_is_clock_skew_and_pauses(harness: Harness) -> None:
    job_id = harness.add_job()
    harness.client.script = [
        ResignError("AuthFailure.SignatureExpire", "expired"),
        ResignError("AuthFailure.SignatureExpire", "expired"),
    ]
    assert harness.run(job_id) is Outcome.deferred
    assert len(harness.client.calls) == 2
    assert harness.circuit.opened == ["AuthFailure.SignatureExpire"]
    job = harness.job(job_id)
    assert job.status is JobStatus.retrying and job.attempts == 0
    assert job.last_error_message is not None and "clock" in job.last_error_message


# -- the database failing at the worst moment


def test_result_write_is_retried_without_buying_it_again(harness: Harness) -> None:
    failures = {"left": 3}

    def fail_result_inserts(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # The SQL text: on PostgreSQL the result's INSERT is a CTE of the job's UPDATE.
        if failures["left"] and "INSERT INTO result " in statement:
            failures["left"] -= 1
            raise exc.OperationalError(
                "INSERT INTO result", {}, Exception("server closed the connection")
            )

    # The pipeline runs Core statements on the session's connection: fail them there.
    connection = harness.sessions.kw["bind"]
    event.listen(connection, "before_cursor_execute", fail_result_inserts)
    deps = harness.deps
    job_id = harness.add_job()
    assert process_job(str(job_id), deps) is Outcome.succeeded
    assert failures["left"] == 0
    assert len(harness.client.calls) == 1  # bought once, written on the 4th try
    assert len(harness.sleeps) == 3
    assert harness.job(job_id).status is JobStatus.succeeded
    with harness.sessions() as session:
        assert session.get(Result, job_id) is not None


def test_long_account_pause_spaces_out_the_waiting_jobs(harness: Harness) -> None:
    # Paused for an hour: jobs come back every few minutes, not every probe interval.
    harness.circuit.paused = Pause(
        "ResourceUnavailable.InArrears", "x", utcnow() - timedelta(hours=1)
    )
    job_id = harness.add_job()
    before = utcnow()
    assert harness.run(job_id) is Outcome.deferred
    next_at = harness.job(job_id).next_attempt_at
    assert next_at is not None
    assert 299.0 <= (next_at - before).total_seconds() <= 452.0
    assert harness.client.calls == []


# -- the thin task around the pipeline


def test_task_hides_crash_details_and_requeues_when_the_database_is_down(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    from worker import app as tasks
    from worker import pipeline, runtime
    from worker.app import create_app

    class _Runtime:
        def deps(self, worker_host: str | None = None) -> str:
            return "deps"

    monkeypatch.setattr(runtime, "get_runtime", lambda _settings: _Runtime())
    app = create_app(settings)

    def crash(job_id: str, deps: Any) -> Outcome:
        raise ValueError("name=CHAN TAI MAN id=1234567(8)")

    monkeypatch.setattr(pipeline, "process_job", crash)
    with pytest.raises(tasks.TaskCrashed) as info:
        tasks.run_job(app, str(uuid.uuid4()), "host")
    assert str(info.value) == "ValueError"
    assert info.value.__suppress_context__ and "CHAN" not in repr(info.value)

    def db_down(job_id: str, deps: Any) -> Outcome:
        raise pipeline.DatabaseUnavailable(claimed=False)

    monkeypatch.setattr(pipeline, "process_job", db_down)
    from celery.exceptions import Reject

    with pytest.raises(Reject) as rejected:
        tasks.run_job(app, str(uuid.uuid4()), "host")
    assert rejected.value.requeue is True  # type: ignore[attr-defined]

    monkeypatch.setattr(pipeline, "process_job", lambda job_id, deps: Outcome.deferred)
    assert tasks.run_job(app, str(uuid.uuid4()), "host") == "deferred"


def test_celery_app_is_configured_for_late_acks_and_no_backend(settings: Settings) -> None:
    from worker.app import create_app, longest_hold_s
    from worker.broker.publish import QUEUE, TASK_NAME

    app = create_app(settings)
    conf = app.conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.result_backend is None and conf.task_ignore_result is True
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_max_retries is None
    assert conf.task_default_queue == QUEUE
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout_s >= longest_hold_s(settings)
    task = app.tasks[TASK_NAME]
    assert task.acks_late is True and task.ignore_result is True
    # Each app runs its own task (bound to its own settings), never another app's.
    other = create_app(settings.model_copy(update={"tenant": "other"}))
    assert other.tasks[TASK_NAME] is not task
    assert other.tasks[TASK_NAME].app is other


def test_result_stored_by_another_run_meanwhile_is_kept(harness: Harness) -> None:
    """Our lease expired mid-call and another run stored a result first: one result per job
    holds, our call is still recorded, and nothing is counted twice."""
    job_id = harness.add_job()

    def other_run_finishes() -> None:
        with harness.sessions() as session, session.begin():
            session.add(Result(job_id=job_id, request_id="other-run"))
            job = session.get(Job, job_id)
            assert job is not None
            job.status = JobStatus.succeeded
            job.attempts = 1

    harness.client.during_call = other_run_finishes
    assert harness.run(job_id) is Outcome.succeeded
    with harness.sessions() as session:
        result = session.get(Result, job_id)
        assert result is not None and result.request_id == "other-run"
    job = harness.job(job_id)
    assert job.status is JobStatus.succeeded and job.attempts == 1
    [attempt] = harness.attempts(job_id)
    assert attempt.outcome_code == "OK" and attempt.request_id == "req-ok"


def test_a_slot_woken_for_too_late_is_given_up_not_used(harness: Harness) -> None:
    """A starved loop wakes long after its slot: sending then could land in the next
    second's window, so the pipeline takes a fresh slot instead (one call in all)."""
    import asyncio
    import time as _time

    reservations: list[float] = []

    class StallingLimiter(SpyLimiter):
        async def reserve(
            self, key: str, *, max_wait_s: float, newcomer: bool = False
        ) -> Reservation:
            reservations.append(max_wait_s)
            if len(reservations) == 1:
                # Block the loop for 0.4 s right after granting a slot 0.2 s away that is
                # the last of its window (0.1 s of slack at 5/s).
                asyncio.get_running_loop().call_soon(_time.sleep, 0.4)
                return Reservation(granted=True, wait_s=0.2, slack_s=0.1)
            return Reservation(granted=True, wait_s=0.0, slack_s=0.5)

    deps = PipelineDeps(
        **{
            **harness.deps.__dict__,
            "limiter": StallingLimiter(),
            "settings": harness.deps.settings.model_copy(update={"qps": 5.0}),
        }
    )
    job_id = harness.add_job()
    assert process_job(str(job_id), deps) is Outcome.succeeded
    assert len(reservations) == 2
    assert len(harness.client.calls) == 1
    job = harness.job(job_id)
    assert job.api_calls == 1 and job.attempts == 1
    assert [a.outcome_code for a in harness.attempts(job_id)] == ["OK"]


def test_a_late_wake_is_still_used_when_its_window_has_room(harness: Harness) -> None:
    """Woken as late, but the slot is the first of its window (0.9 s of slack at 5/s): the
    call still lands in that window, so the slot is used, not wasted."""
    import asyncio
    import time as _time

    reservations: list[float] = []

    class StallingLimiter(SpyLimiter):
        async def reserve(
            self, key: str, *, max_wait_s: float, newcomer: bool = False
        ) -> Reservation:
            reservations.append(max_wait_s)
            asyncio.get_running_loop().call_soon(_time.sleep, 0.4)
            return Reservation(granted=True, wait_s=0.2, slack_s=0.9)

    deps = PipelineDeps(
        **{
            **harness.deps.__dict__,
            "limiter": StallingLimiter(),
            "settings": harness.deps.settings.model_copy(update={"qps": 5.0}),
        }
    )
    job_id = harness.add_job()
    assert process_job(str(job_id), deps) is Outcome.succeeded
    assert len(reservations) == 1
    assert len(harness.client.calls) == 1
