"""Retention, purge and erasure on a migrated PostgreSQL: jobs stored by the producer (its image
dedup included) and finished by the worker's own statements (`worker.store.job_sql`)."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from emulator.specimen import make_specimen
from models import (
    Attempt,
    Base,
    DecisionReason,
    Image,
    Job,
    JobEvent,
    JobStatus,
    KeptAnswer,
    Portrait,
    Result,
    Warning,
)
from tests.fixtures.workers import sealed_job, sealer_for_tests
from worker.broker.publish import RecordingPublisher
from worker.decision.apply import decide_answer, limits_of
from worker.decision.policy import policy_for
from worker.errors import StoreFailed
from worker.privacy.crypto import DecryptError
from worker.privacy.fields import (
    JOB_PERSONAL_COLUMNS,
    RESULT_LOOKUP_COLUMNS,
    RESULT_PERSONAL_COLUMNS,
)
from worker.producer import JobSpec, submit_many
from worker.replay import REFUSED_ERASED, REFUSED_IMAGES_DELETED, replay
from worker.settings import Settings
from worker.store import job_sql, kept
from worker.store.erasure import erase
from worker.store.images import store_image
from worker.store.retention import PurgeReport, purge, release_images
from worker.sweeper import sweep_once
from worker.tencent.types import CardWarning, OcrResult

TENANT = "acme"
ID_NUMBER = "1234567(8)"
NAME = "CHAN TAI MAN"
PORTRAIT = b"\xff\xd8\xff-portrait-of-the-holder"
URL = "https://cards.example/front.jpg?token=s3cret"
DAY_S = 86_400.0


@pytest.fixture
def settings() -> Settings:
    return Settings(tenant=TENANT, url_resolve_timeout_s=0.2)


def now() -> datetime:
    return datetime.now(UTC)


def specimen(seed: int) -> bytes:
    return make_specimen(seed=seed).image


def submit(
    factory: sessionmaker[Session],
    settings: Settings,
    *images: bytes,
    tag: str | None = None,
    portrait: bool = True,
) -> list[uuid.UUID]:
    specs = [JobSpec(front=data, tag=tag, portrait=portrait) for data in images]
    return submit_many(factory, RecordingPublisher(), settings, specs, sealer=sealer_for_tests())


def add_url_job(factory: sessionmaker[Session], *, tag: str | None = None) -> uuid.UUID:
    with factory() as session, session.begin():
        job = sealed_job(
            tenant=TENANT, front_url=URL, back_url=URL + "&back", tag=tag, portrait=True
        )
        session.add(job)
    return job.id


def answer(seed: int = 0) -> OcrResult:
    return OcrResult(
        request_id=f"req-{seed}",
        en_last_name="CHAN",
        en_first_name="TAI MAN",
        cn_last_name="陳",
        id_number=ID_NUMBER,
        birthday=date(1990, 3, 5),
        sex="M",
        validity_period_text="永久有效",
        height_m=Decimal("1.64"),
        symbol="ASM",
        resident_type="Permanent",
        portrait=PORTRAIT,
        warnings=(CardWarning(-9103, "screen_recapture"),),
    )


def _start(conn: sa.Connection, job_id: uuid.UUID) -> job_sql.Claimed:
    at = now()
    claimed = job_sql.claim(
        conn,
        job_id,
        now=at,
        lease_until=at + timedelta(minutes=2),
        host="h",
        open_attempt=True,
        sealer=sealer_for_tests(),
    )
    assert claimed is not None and claimed.opened
    return claimed


def _call(code: str = "OK") -> job_sql.CallRecord:
    at = now()
    return job_sql.CallRecord(at, at, code, None, "req", 5)


def succeed(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    """The worker's success path (one statement on PostgreSQL)."""
    with factory() as session, session.begin():
        conn = session.connection()
        claimed = _start(conn, job_id)
        result = answer()
        decision = decide_answer(
            result,
            policy_for(TENANT, None, None),
            sides_identical=False,
            read_at=now(),
            limits=limits_of(Settings()),
        )
        job_sql.store_success(
            conn,
            job_id,
            claimed.last_number + 1,
            _call(),
            result,
            True,
            decision,
            sealer=sealer_for_tests(),
        )


def fail(factory: sessionmaker[Session], job_id: uuid.UUID, *, poison: bool = False) -> None:
    """A failed job; `poison`: the API answered and storing failed (its answer kept)."""
    with factory() as session, session.begin():
        conn = session.connection()
        claimed = _start(conn, job_id)
        number = claimed.last_number + 1
        if poison:
            kept.fail_keeping_answer(
                conn,
                job_id,
                number,
                _call(),
                answer={"RequestId": "r", "ID": ID_NUMBER, "EnLastName": "CHAN"},
                error=StoreFailed("store", "IntegrityError"),
                now=now(),
                sealer=sealer_for_tests(),
            )
            return
        job_sql.close_attempt(conn, job_id, number, _call("FailedOperation.ImageNoSpecifiedCard"))
        job_sql.mark_failed(conn, job_id, now(), "FailedOperation.ImageNoSpecifiedCard", "no card")


def job_row(factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def count(factory: sessionmaker[Session], model: type[Base], *where: Any) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def personal_values(factory: sessionmaker[Session], job_id: uuid.UUID) -> dict[str, Any]:
    """The result's personal columns, opened (None where nothing is stored)."""
    with factory() as session:
        row = session.execute(
            select(*(Result.__table__.c[c] for c in RESULT_PERSONAL_COLUMNS)).where(
                Result.job_id == job_id
            )
        ).one()
    sealer = sealer_for_tests()
    return {
        column: sealer.open_text("result", column, job_id, value)
        for column, value in row._mapping.items()
    }


def everything(factory: sessionmaker[Session]) -> Iterator[tuple[str, str, object]]:
    """Every value of every table, as (table, column, value); sealed values opened."""
    sealer = sealer_for_tests()
    with factory() as session:
        for table in Base.metadata.sorted_tables:
            keys = [c.name for c in table.primary_key.columns]
            for row in session.execute(select(table)):
                mapping = row._mapping
                row_id = mapping[keys[0]] if len(keys) == 1 else None
                for column, value in mapping.items():
                    if isinstance(value, bytes | memoryview) and row_id is not None:
                        # A hash is not sealed: it is looked at as it is.
                        with contextlib.suppress(DecryptError):
                            value = sealer.open(table.name, str(column), row_id, bytes(value))
                    yield table.name, str(column), value


def holds_person(factory: sessionmaker[Session], images: list[bytes]) -> list[str]:
    """Where a piece of the person is still stored (table.column), if anywhere."""
    found = []
    texts = (ID_NUMBER, NAME.split()[0], "TAI MAN", "s3cret", "cards.example", "1990-03-05")
    for table, column, value in everything(factory):
        if isinstance(value, bytes | memoryview):
            data = bytes(value)
            if (
                data == PORTRAIT
                or any(data == image for image in images)
                or any(t.encode() in data for t in texts)
            ):
                found.append(f"{table}.{column}")
        elif (isinstance(value, str) and any(t in value for t in texts)) or (
            isinstance(value, date) and value == date(1990, 3, 5)
        ):
            found.append(f"{table}.{column}")
    return found


# -- retention ---------------------------------------------------------------------------------


def test_images_and_urls_gone_at_the_first_sweep_after_success(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    (stored,) = submit(session_factory, settings, specimen(1))
    by_url = add_url_job(session_factory)
    waiting = submit(session_factory, settings, specimen(2))[0]
    for job_id in (stored, by_url):
        succeed(session_factory, job_id)
    assert count(session_factory, Image) == 2

    report = sweep_once(session_factory, RecordingPublisher(), settings, now=now())

    assert report.retention.jobs_images == 2
    assert (report.retention.images, report.retention.urls) == (1, 2)
    for job_id in (stored, by_url):
        job = job_row(session_factory, job_id)
        assert job.images_deleted_at is not None
        assert [getattr(job, c) for c in JOB_PERSONAL_COLUMNS] == [None, None]
        assert (job.front_image_id, job.back_image_id) == (None, None)
        assert job.status == JobStatus.succeeded
    # Only the job still waiting keeps its image; the results keep their fields (90 days).
    assert count(session_factory, Image) == 1
    assert job_row(session_factory, waiting).front_image_id is not None
    assert personal_values(session_factory, stored)["id_number"] == ID_NUMBER


def test_a_failed_job_keeps_its_images_for_replay_until_the_failed_retention(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    plain, poison = submit(session_factory, settings, specimen(3), specimen(4))
    fail(session_factory, plain)
    fail(session_factory, poison, poison=True)

    sweep_once(session_factory, RecordingPublisher(), settings, now=now())
    assert job_row(session_factory, plain).images_deleted_at is None
    assert count(session_factory, Image) == 2 and count(session_factory, KeptAnswer) == 1
    dry = replay(
        session_factory,
        RecordingPublisher(),
        settings,
        job_ids=[plain],
        actor="t",
        reason=None,
        dry_run=True,
        sealer=sealer_for_tests(),
    )
    assert dry.replayed == [plain]

    later = now() + timedelta(seconds=settings.failed_image_retention_s + 1)
    report = purge(session_factory, settings, now=later)
    assert (report.removed.jobs_images, report.removed.images) == (2, 2)
    assert report.removed.kept_answers == 1
    assert count(session_factory, Image) == 0 and count(session_factory, KeptAnswer) == 0

    publisher = RecordingPublisher()
    refused = replay(
        session_factory,
        publisher,
        settings,
        job_ids=[plain, poison],
        actor="t",
        reason=None,
        sealer=sealer_for_tests(),
    )
    assert refused.replayed == [] and publisher.published == []
    assert refused.refused_codes == {
        plain: REFUSED_IMAGES_DELETED,
        poison: REFUSED_IMAGES_DELETED,
    }
    assert "retention" in refused.refused[plain]
    assert job_row(session_factory, plain).status == JobStatus.failed


def test_result_retention_counts_first_then_keeps_only_what_is_not_personal(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    (job_id,) = submit(session_factory, settings, specimen(5))
    succeed(session_factory, job_id)
    purge(session_factory, settings, now=now())  # its images: gone now
    assert count(session_factory, Portrait) == 1

    later = now() + timedelta(seconds=settings.result_retention_s + 1)
    before = list(everything(session_factory))
    dry = purge(session_factory, settings, now=later, dry_run=True)
    assert dry.dry_run and (dry.removed.results, dry.removed.portraits) == (1, 1)
    assert list(everything(session_factory)) == before  # a dry run changes nothing

    done = purge(session_factory, settings, now=later)
    assert done.removed.to_dict() == dry.removed.to_dict()
    values = personal_values(session_factory, job_id)
    assert values == dict.fromkeys((*RESULT_PERSONAL_COLUMNS,))
    for column in RESULT_LOOKUP_COLUMNS:
        assert count(session_factory, Result, Result.__table__.c[column].is_not(None)) == 0
    assert count(session_factory, Portrait) == 0
    # The job keeps status, codes, warnings, decision and history.
    with session_factory() as session:
        result = session.get(Result, job_id)
        assert result is not None and result.personal_deleted_at is not None
        assert result.decision is not None and result.request_id == "req-0"
        assert session.scalar(select(func.count()).where(Warning.job_id == job_id)) == 1
        assert session.scalar(select(func.count()).where(Attempt.job_id == job_id)) == 1
    assert job_row(session_factory, job_id).status == JobStatus.succeeded
    assert holds_person(session_factory, [specimen(5)]) == []
    # Nothing is due any more.
    assert purge(session_factory, settings, now=later).removed.total == 0


def test_the_sweeper_works_in_bounded_batches(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    ids = [add_url_job(session_factory) for _ in range(3)]
    for job_id in ids:
        succeed(session_factory, job_id)
    first = purge(session_factory, settings, now=now(), max_batches=1, batch=2)
    assert first.removed.jobs_images == 2 and not first.complete
    second = purge(session_factory, settings, now=now(), max_batches=1, batch=2)
    assert second.removed.jobs_images == 1 and second.complete


# -- erasure -----------------------------------------------------------------------------------


def test_erase_by_tag_leaves_nothing_of_the_person_anywhere(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    images = [specimen(6), specimen(7), specimen(8)]
    done, poisoned, waiting = submit(session_factory, settings, *images, tag="customer-42")
    by_url = add_url_job(session_factory, tag="customer-42")
    succeed(session_factory, done)
    fail(session_factory, poisoned, poison=True)
    other = submit(session_factory, settings, specimen(9), tag="someone-else")[0]
    assert holds_person(session_factory, images)  # the check sees what is there

    dry = erase(session_factory, tenant=TENANT, tag="customer-42", actor="dpo@bank", dry_run=True)
    assert sorted(dry.erased) == sorted([done, poisoned, waiting, by_url])
    assert holds_person(session_factory, images)  # a dry run changes nothing

    report = erase(
        session_factory, tenant=TENANT, tag="customer-42", actor="dpo@bank", reason="GDPR art. 17"
    )
    assert report.removed.to_dict() == dry.removed.to_dict()
    assert report.removed.images == 3 and report.removed.urls == 2
    assert (report.removed.results, report.removed.portraits, report.removed.kept_answers) == (
        1,
        1,
        1,
    )
    assert holds_person(session_factory, images) == []
    with session_factory() as session:
        events = session.execute(
            select(JobEvent.job_id, JobEvent.actor, JobEvent.reason).where(
                JobEvent.kind == "erased"
            )
        ).all()
    assert sorted(e.job_id for e in events) == sorted([done, poisoned, waiting, by_url])
    assert {(e.actor, e.reason) for e in events} == {("dpo@bank", "GDPR art. 17")}
    # The queued one ends failed with our code; none can be claimed again.
    stopped = job_row(session_factory, waiting)
    assert (stopped.status, stopped.last_error_code) == (JobStatus.failed, "Internal.Erased")
    assert sorted(report.stopped) == sorted([waiting, by_url])
    # Another tag's job is untouched.
    assert job_row(session_factory, other).front_image_id is not None
    assert count(session_factory, Image) == 1
    # What is not personal stays: the decision and its reasons, the warnings.
    assert count(session_factory, DecisionReason, DecisionReason.job_id == done) >= 1
    assert count(session_factory, Warning, Warning.job_id == done) == 1


def test_erasing_one_job_never_touches_another_jobs_shared_image(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    same = specimen(10)
    first, second = submit(session_factory, settings, same, same)
    shared = job_row(session_factory, first).front_image_id
    assert shared is not None and job_row(session_factory, second).front_image_id == shared
    succeed(session_factory, first)
    succeed(session_factory, second)  # its images would go at the next sweep: not yet

    report = erase(session_factory, tenant=TENANT, job_ids=[first], actor="dpo")
    assert report.removed.images == 0  # still used by `second`
    with session_factory() as session:
        image = session.get(Image, shared)
        assert image is not None
        assert sealer_for_tests().open_image(image.id, image.data) == same
    assert job_row(session_factory, second).front_image_id == shared
    assert personal_values(session_factory, second)["id_number"] == ID_NUMBER

    again = erase(session_factory, tenant=TENANT, job_ids=[second], actor="dpo")
    assert again.removed.images == 1
    assert count(session_factory, Image) == 0


def test_an_erased_job_is_never_claimed_nor_replayed(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    (queued,) = submit(session_factory, settings, specimen(11))
    erase(session_factory, tenant=TENANT, job_ids=[queued], actor="dpo")
    with session_factory() as session, session.begin():
        # Even pushed back to queued by hand, the claim refuses an erased job.
        session.execute(sa.update(Job).where(Job.id == queued).values(status=JobStatus.queued))
        at = now()
        claimed = job_sql.claim(
            session.connection(),
            queued,
            now=at,
            lease_until=at + timedelta(minutes=1),
            host="h",
            sealer=sealer_for_tests(),
        )
    assert claimed is None
    publisher = RecordingPublisher()
    with session_factory() as session, session.begin():
        session.execute(sa.update(Job).where(Job.id == queued).values(status=JobStatus.failed))
    refused = replay(
        session_factory,
        publisher,
        settings,
        job_ids=[queued],
        actor="t",
        reason=None,
        force=True,
        sealer=sealer_for_tests(),
    )
    assert refused.refused_codes == {queued: REFUSED_ERASED} and publisher.published == []


def test_erase_refuses_a_running_job_and_another_tenants(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    (running,) = submit(session_factory, settings, specimen(12))
    with session_factory() as session, session.begin():
        _start(session.connection(), running)
    mine = erase(session_factory, tenant=TENANT, job_ids=[running], actor="dpo")
    assert list(mine.refused) == [running] and "running" in mine.refused[running]
    assert job_row(session_factory, running).erased_at is None
    theirs = erase(session_factory, tenant="other", job_ids=[running], actor="dpo")
    assert theirs.refused == {running: "not found"} and theirs.erased == []


# -- shared images under concurrency (real commits, two connections) ---------------------------


@pytest.fixture
def committed(
    fresh_migrated_database: Callable[[], str],
) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    url = fresh_migrated_database()
    engine = sa.create_engine(url)
    yield sessionmaker(engine, expire_on_commit=False), Settings(database_url=url, tenant=TENANT)
    engine.dispose()


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # the test reads it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_retention_waits_for_a_producer_reusing_the_image_and_keeps_it(
    committed: tuple[sessionmaker[Session], Settings],
) -> None:
    factory, settings = committed
    same = specimen(30)
    (old,) = submit(factory, settings, same)
    shared = job_row(factory, old).front_image_id
    succeed(factory, old)
    producer = factory()
    producer.begin()
    image = store_image(
        producer, sealer_for_tests(), TENANT, same
    )  # found by digest, its row locked
    assert image.id == shared
    newcomer = Job(tenant=TENANT, front_image_id=image.id)
    producer.add(newcomer)
    producer.flush()

    thread, out = _in_thread(lambda: purge(factory, settings, now=now()))
    thread.join(1.5)
    assert thread.is_alive()  # waiting for the producer's commit
    producer.commit()
    producer.close()
    thread.join(20)
    [report] = out
    assert isinstance(report, PurgeReport), report
    assert (report.removed.jobs_images, report.removed.images) == (1, 0)
    with factory() as session:
        kept_image = session.get(Image, shared)
        assert kept_image is not None
        assert sealer_for_tests().open_image(kept_image.id, kept_image.data) == same
    assert job_row(factory, newcomer.id).front_image_id == shared


def test_a_producer_waits_for_a_deletion_and_stores_the_image_again(
    committed: tuple[sessionmaker[Session], Settings],
) -> None:
    factory, settings = committed
    same = specimen(31)
    (old,) = submit(factory, settings, same)
    shared = job_row(factory, old).front_image_id
    succeed(factory, old)
    with factory() as deleter:
        deleter.begin()
        removed = release_images(deleter.connection(), [old], now())
        assert removed.images == 1  # deleted, not committed yet

        thread, out = _in_thread(lambda: submit(factory, settings, same))
        thread.join(1.5)
        assert thread.is_alive()  # the producer's lookup waits for the deletion
        deleter.commit()
    thread.join(20)
    [ids] = out
    assert isinstance(ids, list), ids
    fresh = job_row(factory, ids[0]).front_image_id
    assert fresh is not None and fresh != shared
    with factory() as session:
        assert session.get(Image, shared) is None
        stored = session.get(Image, fresh)
        assert stored is not None
        assert sealer_for_tests().open_image(stored.id, stored.data) == same


def test_the_purge_command_counts_first_then_removes_and_prints_no_value(
    committed: tuple[sessionmaker[Session], Settings],
) -> None:
    from typer.testing import CliRunner

    from worker.cli import app as cli_app

    factory, settings = committed
    (job_id,) = submit(factory, settings, specimen(40))
    succeed(factory, job_id)
    env = {"MACAO_OCR_DATABASE_URL": settings.database_url, "MACAO_OCR_RESULT_RETENTION_S": "0"}
    expected = {"jobs_images": 1, "images": 1, "urls": 0, "results": 1, "portraits": 1}

    dry = CliRunner().invoke(cli_app, ["purge", "--dry-run", "--json"], env=env)
    assert dry.exit_code == 0, dry.output
    counted = json.loads(dry.stdout)
    assert counted == {"dry_run": True, "complete": True, "kept_answers": 0, **expected}
    assert count(factory, Image) == 1 and count(factory, Portrait) == 1
    assert personal_values(factory, job_id)["id_number"] == ID_NUMBER

    done = CliRunner().invoke(cli_app, ["purge", "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {**counted, "dry_run": False}
    assert count(factory, Image) == 0 and count(factory, Portrait) == 0
    assert personal_values(factory, job_id)["id_number"] is None
    again = CliRunner().invoke(cli_app, ["purge"], env=env)
    assert again.exit_code == 0 and again.stdout.startswith("removed: jobs_images 0")
    for output in (dry.output, done.output, again.output):
        assert ID_NUMBER not in output and "CHAN" not in output
