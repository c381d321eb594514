"""Webhooks without a worker: signing (checked by the specification's library), the URL
policy, the outbox written with each finish (PostgreSQL's one statement, SQLite's
transaction, the batch's last job under concurrency), delivery attempts and retries,
secret rotation and redelivery."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError

import migrations
from models import (
    Attempt,
    Batch,
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
)
from tests.fixtures.workers import sealer_for_tests
from worker.broker.publish import RecordingPublisher
from worker.errors import InputError, WebhookUrlRefused
from worker.settings import Settings
from worker.store import batches, job_sql
from worker.tencent.types import OcrResult
from worker.webhooks import admin, signing
from worker.webhooks.delivery import DeliveryDeps, SendResult, deliver, message_id
from worker.webhooks.urls import PolicyResolver, address_allowed, check_url

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- signing -------------------------------------------------------------------------------


def test_secret_is_whsec_and_base64_of_at_least_24_bytes() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert signing.new_secret() != secret


def test_the_standardwebhooks_library_verifies_our_signature() -> None:
    secret = signing.new_secret()
    body = signing.body("job.succeeded", NOW, {"job_id": "j", "status": "succeeded"})
    headers = signing.headers([secret], "msg_1", body, now=datetime.now(UTC))
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


def test_during_a_rotation_either_secret_verifies() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    body = b'{"type":"job.failed"}'
    headers = signing.headers([new, old], "msg_2", body, now=datetime.now(UTC))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(body, headers)


# -- URL policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.100.100.200/",
        "http://[::1]/hook",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "https://localhost/hook",
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(InputError) as err:
        check_url(url, allow_private=False)
    assert err.value.rule == "webhook_url_private"
    assert "not a public address" in err.value.message


def test_private_receivers_only_with_the_allowance() -> None:
    assert check_url("http://127.0.0.1:8123/h", allow_private=True)
    assert check_url("https://8.8.8.8/hook", allow_private=False)


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("ftp://example.com/x", "webhook_url_scheme"),
        ("https://user:pw@example.com/x", "webhook_url_credentials"),
        ("https:///x", "webhook_url_host"),
    ],
)
def test_malformed_urls_name_the_rule(url: str, rule: str) -> None:
    with pytest.raises(InputError) as err:
        check_url(url, allow_private=True)
    assert err.value.rule == rule


def test_v4_mapped_and_metadata_addresses() -> None:
    assert not address_allowed("::ffff:169.254.169.254", allow_private=False)
    assert address_allowed("1.1.1.1", allow_private=False)
    assert not address_allowed("224.0.0.1", allow_private=True)


async def test_the_resolver_drops_internal_answers_at_connect_time() -> None:
    class Fake:
        def __init__(self, *hosts: str) -> None:
            self.hosts = hosts

        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[dict[str, Any]]:
            return [{"host": h, "hostname": host, "port": port} for h in self.hosts]

        async def close(self) -> None:
            pass

    # DNS rebinding: a name that now answers an internal address.
    rebinding = PolicyResolver(allow_private=False, inner=Fake("10.0.0.5"))  # type: ignore[arg-type]
    with pytest.raises(WebhookUrlRefused):
        await rebinding.resolve("hooks.example.com", 443)
    mixed = PolicyResolver(allow_private=False, inner=Fake("10.0.0.5", "93.184.216.34"))  # type: ignore[arg-type]
    assert [r["host"] for r in await mixed.resolve("hooks.example.com", 443)] == ["93.184.216.34"]


# -- the outbox --------------------------------------------------------------------------------


@pytest.fixture
def pg(fresh_migrated_database: Callable[[], str]) -> Iterator[sa.Engine]:
    """A really committing PostgreSQL (the concurrency test needs two connections)."""
    engine = sa.create_engine(fresh_migrated_database())
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[sa.Engine]:
    url = f"sqlite:///{tmp_path / 'wh.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


def add_endpoint(engine: sa.Engine, tenant: str = "t1") -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(WebhookEndpoint).values(
                tenant=tenant, url="https://hooks.example.com/x", created_at=NOW, updated_at=NOW
            )
        )
        conn.execute(
            sa.insert(WebhookSecret).values(
                tenant=tenant, secret=signing.new_secret(), created_at=NOW
            )
        )


def add_jobs(
    engine: sa.Engine, n: int, *, tenant: str = "t1", batch: str | None = "b1"
) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    with Session(engine) as session, session.begin():
        conn = session.connection()
        # As the producer does: the label's batch row counts the jobs in.
        batch_id = None if batch is None else batches.count_into_label(session, tenant, batch, n)
        for i, job_id in enumerate(ids):
            conn.execute(
                sa.insert(Job).values(
                    id=job_id,
                    tenant=tenant,
                    status=JobStatus.running,
                    front_url=sealer_for_tests().seal_url(
                        job_id, "front_url", "https://img.example.com/a.jpg"
                    ),
                    portrait=False,
                    attempts=0,
                    api_calls=1,
                    created_at=NOW,
                    batch=batch,
                    batch_id=batch_id,
                    tag=f"tag-{i}",
                )
            )
            conn.execute(sa.insert(Attempt).values(job_id=job_id, number=1, started_at=NOW))
    return ids


def deliveries(engine: sa.Engine) -> list[WebhookDelivery]:
    with Session(engine) as session:
        return list(
            session.scalars(sa.select(WebhookDelivery).order_by(WebhookDelivery.created_at))
        )


_FIELDS: dict[str, Any] = {f.name: None for f in dataclasses.fields(OcrResult)}
RESULT = OcrResult(
    **_FIELDS
    | {
        "request_id": "r-1",
        "warnings": (),
        "warning_service_disabled": False,
        "id_number": "1234567(8)",
    }
)
CALL = job_sql.CallRecord(NOW, NOW, "OK", None, "r-1", 12)


def succeed(engine: sa.Engine, job_id: uuid.UUID) -> None:
    if engine.dialect.name == "postgresql":
        # As a worker runs it: one statement, no transaction around it.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            job_sql.store_success(conn, job_id, 1, CALL, RESULT, False, sealer=sealer_for_tests())
    else:
        with engine.begin() as conn:
            job_sql.store_success(conn, job_id, 1, CALL, RESULT, False, sealer=sealer_for_tests())


@pytest.mark.parametrize("backend", ["pg", "sqlite"])
def test_finishes_write_job_events_and_the_last_one_the_batch_event(
    backend: str, request: pytest.FixtureRequest
) -> None:
    engine: sa.Engine = request.getfixturevalue(backend)
    add_endpoint(engine)
    ids = add_jobs(engine, 3)
    succeed(engine, ids[0])
    with engine.begin() as conn:
        job_sql.mark_failed(conn, ids[1], NOW, "FailedOperation.ImageDecodeFailed", "bad")
    assert [(d.event_type, d.job_id) for d in deliveries(engine)] == [
        ("job.succeeded", ids[0]),
        ("job.failed", ids[1]),
    ]
    succeed(engine, ids[2])
    rows = deliveries(engine)
    assert sorted(d.event_type for d in rows) == [
        "batch.completed",
        "job.failed",
        "job.succeeded",
        "job.succeeded",
    ]
    by_job = {d.job_id: d for d in rows}
    assert by_job[ids[1]].error_code == "FailedOperation.ImageDecodeFailed"
    assert by_job[ids[0]].error_code is None
    assert by_job[ids[0]].tag == "tag-0" and by_job[ids[0]].batch == "b1"
    assert all(d.status == DeliveryStatus.pending for d in rows)


def test_no_endpoint_no_outbox_row(pg: sa.Engine) -> None:
    add_endpoint(pg, tenant="other")
    ids = add_jobs(pg, 1)
    succeed(pg, ids[0])
    assert deliveries(pg) == []
    with Session(pg) as session:
        assert session.get_one(Job, ids[0]).status == JobStatus.succeeded


def test_the_last_two_jobs_finishing_at_once_complete_the_batch_exactly_once(
    pg: sa.Engine,
) -> None:
    """A's transaction finishes job 1 but has not committed when B finishes job 2 (the
    batch's last). B's probe must wait for A's commit and see it, or the batch would never
    be reported complete."""
    add_endpoint(pg)
    ids = add_jobs(pg, 2)
    a = pg.connect()
    tx = a.begin()
    job_sql.mark_failed(a, ids[0], NOW, "FailedOperation.OcrFailed", "m")
    finished = threading.Event()
    errors: list[BaseException] = []

    def b() -> None:
        try:
            succeed(pg, ids[1])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
        finished.set()

    thread = threading.Thread(target=b)
    thread.start()
    # B is blocked on A's row lock: it has not finished while A is open.
    assert not finished.wait(1.0)
    tx.commit()
    a.close()
    thread.join(30)
    assert not errors
    assert sorted(d.event_type for d in deliveries(pg)) == [
        "batch.completed",
        "job.failed",
        "job.succeeded",
    ]


def test_two_last_jobs_finishing_at_once_in_one_statement_each_write_one_batch_event(
    pg: sa.Engine,
) -> None:
    """Real concurrency, many times: two workers' one-statement successes of a batch's last
    two jobs, started together. The batch counter's UPDATE serialises them on the batch row:
    exactly one batch.completed per batch, and the counters say succeeded = total."""
    add_endpoint(pg)
    rounds = 12
    pairs = [add_jobs(pg, 2, batch=f"pair-{r}") for r in range(rounds)]
    errors: list[BaseException] = []
    for pair in pairs:
        gate = threading.Barrier(2)

        def finish(job_id: uuid.UUID, gate: threading.Barrier = gate) -> None:
            try:
                gate.wait(10)
                succeed(pg, job_id)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=finish, args=(job_id,)) for job_id in pair]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors
    events = [d for d in deliveries(pg) if d.event_type == "batch.completed"]
    assert sorted(str(d.batch) for d in events) == sorted(f"pair-{r}" for r in range(rounds))
    with Session(pg) as session:
        rows = session.scalars(sa.select(Batch).where(Batch.tenant == "t1")).all()
        assert {(b.total, b.succeeded, b.failed) for b in rows} == {(2, 2, 0)}


def test_the_batch_event_is_the_counters_not_a_probe_of_the_jobs(pg: sa.Engine) -> None:
    """A batch whose total is not reached does not complete, even when no job of it is left
    unfinished (a submission still committing its chunks has counted them in first)."""
    add_endpoint(pg)
    ids = add_jobs(pg, 1, batch="growing")
    with Session(pg) as session, session.begin():
        batches.count_into_label(session, "t1", "growing", 1)  # a second job on its way
    succeed(pg, ids[0])
    assert [d.event_type for d in deliveries(pg)] == ["job.succeeded"]
    [later] = add_jobs(pg, 1, batch="growing")
    with Session(pg) as session, session.begin():
        batches.uncount(session, batches.label_batch_id("t1", "growing"), 1)
    succeed(pg, later)
    events = [(d.event_type, d.batch) for d in deliveries(pg)]
    assert events.count(("batch.completed", "growing")) == 1


def test_an_unnamed_api_batch_is_told_by_its_id(pg: sa.Engine) -> None:
    add_endpoint(pg)
    batch_id = uuid.uuid4()
    with pg.begin() as conn:
        conn.execute(
            sa.insert(Batch).values(
                id=batch_id, tenant="t1", name=None, total=1, succeeded=0, failed=0, created_at=NOW
            )
        )
    [job_id] = add_jobs(pg, 1, batch=None)
    with pg.begin() as conn:
        conn.execute(
            sa.update(Job).where(Job.id == job_id).values(batch=str(batch_id), batch_id=batch_id)
        )
    succeed(pg, job_id)
    [event] = [d for d in deliveries(pg) if d.event_type == "batch.completed"]
    assert event.batch == str(batch_id)


# -- delivery ------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeReceiver:
    answers: list[int]
    seen: list[tuple[str, dict[str, str], bytes]] = dataclasses.field(default_factory=list)

    def __call__(self, url: str, headers: Mapping[str, str], body: bytes) -> SendResult:
        self.seen.append((url, dict(headers), body))
        return SendResult(status_code=self.answers.pop(0), latency_ms=3)


def delivery_deps(
    engine: sa.Engine, send: Any, clock: Callable[[], datetime], **settings: Any
) -> DeliveryDeps:
    return DeliveryDeps(
        settings=Settings(**settings),
        transaction=engine.begin,
        send=send,
        clock=clock,
        rng=random.Random(1),
    )


def the_secret(engine: sa.Engine, tenant: str = "t1") -> str:
    with Session(engine) as session:
        return session.scalars(
            sa.select(WebhookSecret.secret).where(WebhookSecret.tenant == tenant)
        ).one()


def test_a_failed_attempt_is_recorded_and_retried_with_backoff_then_delivered(
    pg: sa.Engine,
) -> None:
    add_endpoint(pg)
    ids = add_jobs(pg, 1, batch=None)
    with pg.begin() as conn:
        job_sql.mark_failed(conn, ids[0], NOW, "FailedOperation.OcrFailed", "card unreadable")
    (row,) = deliveries(pg)
    receiver = FakeReceiver([500, 204])
    now = [NOW + timedelta(seconds=1)]
    deps = delivery_deps(pg, receiver, lambda: now[0], webhook_backoff_base_s=10)

    assert deliver(row.id, deps) == "retrying"
    (after,) = deliveries(pg)
    assert after.status == DeliveryStatus.pending and after.attempts == 1
    assert after.last_status_code == 500
    assert now[0] <= after.next_attempt_at <= now[0] + timedelta(seconds=10)
    # Not due yet: a duplicate message does nothing.
    assert deliver(row.id, deps) == "not_claimed"
    now[0] = after.next_attempt_at
    assert deliver(row.id, deps) == "delivered"
    assert deliver(row.id, deps) == "not_claimed"

    with Session(pg) as session:
        attempts = list(session.scalars(sa.select(WebhookAttempt).order_by(WebhookAttempt.number)))
        final = session.get_one(WebhookDelivery, row.id)
    assert [(a.number, a.status_code, a.latency_ms) for a in attempts] == [(1, 500, 3), (2, 204, 3)]
    assert final.status == DeliveryStatus.delivered and final.delivered_at is not None
    # Same id and body each time; each verifies with the tenant's secret.
    assert len({h["webhook-id"] for _, h, _ in receiver.seen}) == 1
    assert receiver.seen[0][1]["webhook-id"] == message_id(row.id)
    assert len({b for _, _, b in receiver.seen}) == 1
    hook = Webhook(the_secret(pg))
    for _, headers, body in receiver.seen:
        headers["webhook-timestamp"] = str(int(time.time()))  # our fake clock is in 2030
        headers["webhook-signature"] = signing.signature(
            [the_secret(pg)], headers["webhook-id"], int(headers["webhook-timestamp"]), body
        )
        payload = hook.verify(body, headers)
        assert payload["data"] == {
            "job_id": str(ids[0]),
            "status": "failed",
            "error_code": "FailedOperation.OcrFailed",
            "batch": None,
            "tag": "tag-0",
        }
    # The job's error message is not sent (it could echo input): only its code.
    assert b"card unreadable" not in receiver.seen[0][2]


def test_retries_stop_only_after_the_window(pg: sa.Engine) -> None:
    add_endpoint(pg)
    ids = add_jobs(pg, 1, batch=None)
    with pg.begin() as conn:
        job_sql.mark_failed(conn, ids[0], NOW, "X", "m")
    (row,) = deliveries(pg)
    now = [NOW]
    deps = delivery_deps(pg, FakeReceiver([503] * 3), lambda: now[0], webhook_max_age_s=86_400)
    assert deliver(row.id, deps) == "retrying"
    now[0] = NOW + timedelta(hours=23, minutes=59)
    assert deliver(row.id, deps) == "retrying"
    now[0] = NOW + timedelta(hours=24, minutes=1)
    assert deliver(row.id, deps) == "failed"
    (final,) = deliveries(pg)
    assert final.status == DeliveryStatus.failed and final.attempts == 3

    # An operator sends it again: a fresh window, published after the commit.
    publisher = RecordingPublisher()
    factory = sessionmaker(pg, expire_on_commit=False)
    done, missing, published = admin.redeliver(factory, publisher, failed=True, now=now[0])
    assert done == [row.id] and missing == [] and published
    assert publisher.published == [row.id]
    (again,) = deliveries(pg)
    assert again.status == DeliveryStatus.pending and again.window_started_at == now[0]
    ok = delivery_deps(pg, FakeReceiver([200]), lambda: now[0])
    assert deliver(row.id, ok) == "delivered"


def test_rotation_keeps_the_old_secret_signing_for_24_hours(pg: sa.Engine) -> None:
    factory = sessionmaker(pg, expire_on_commit=False)
    first = admin.set_endpoint(factory, "t1", "https://hooks.example.com/a", now=NOW)
    assert first.secret is not None
    same = admin.set_endpoint(factory, "t1", "https://hooks.example.com/b", now=NOW)
    assert same.secret is None and same.url == "https://hooks.example.com/b"
    rotated = admin.set_endpoint(factory, "t1", None, rotate_secret=True, now=NOW)
    assert rotated.secret not in (None, first.secret)
    assert rotated.previous_secret_expires_at == NOW + timedelta(hours=24)
    assert json.loads(json.dumps(rotated.to_dict()))["secret"] == rotated.secret

    ids = add_jobs(pg, 1, batch=None)
    with pg.begin() as conn:
        job_sql.mark_failed(conn, ids[0], NOW, "X", "m")
    (row,) = deliveries(pg)
    receiver = FakeReceiver([200])
    assert (
        deliver(row.id, delivery_deps(pg, receiver, lambda: NOW + timedelta(hours=1)))
        == "delivered"
    )
    assert len(receiver.seen[0][1]["webhook-signature"].split(" ")) == 2

    # After 24 h only the new secret signs.
    with pg.begin() as conn:
        job_sql.mark_failed(conn, add_jobs(pg, 1, batch=None)[0], NOW, "X", "m")
    later = next(d for d in deliveries(pg) if d.status == DeliveryStatus.pending)
    receiver = FakeReceiver([200])
    deliver(later.id, delivery_deps(pg, receiver, lambda: NOW + timedelta(hours=25)))
    assert len(receiver.seen[0][1]["webhook-signature"].split(" ")) == 1


def test_rotation_without_an_endpoint_names_the_missing_url(pg: sa.Engine) -> None:
    factory = sessionmaker(pg, expire_on_commit=False)
    with pytest.raises(InputError) as err:
        admin.set_endpoint(factory, "nobody", None, rotate_secret=True)
    assert err.value.rule == "webhook_url_missing"


# -- the sweeper publishes due deliveries --------------------------------------------------


def test_the_sweeper_publishes_due_deliveries_once_and_again_when_lost(pg: sa.Engine) -> None:
    from worker.sweeper import sweep_once

    add_endpoint(pg)
    ids = add_jobs(pg, 1, batch=None)
    with pg.begin() as conn:
        job_sql.mark_failed(conn, ids[0], NOW, "X", "m")
    (row,) = deliveries(pg)
    factory = sessionmaker(pg, expire_on_commit=False)
    settings = Settings(republish_after_s=60)
    webhooks = RecordingPublisher()

    def sweep(at: datetime) -> None:
        sweep_once(factory, RecordingPublisher(), settings, now=at, webhook_publisher=webhooks)

    sweep(NOW + timedelta(seconds=1))
    assert webhooks.published == [row.id]
    sweep(NOW + timedelta(seconds=2))
    assert webhooks.published == [row.id]  # its message is out: not again
    sweep(NOW + timedelta(seconds=62))  # never taken (lost with a Redis restart): again
    assert webhooks.published == [row.id, row.id]
    # Delivered: never again.
    deliver(row.id, delivery_deps(pg, FakeReceiver([200]), lambda: NOW + timedelta(seconds=63)))
    sweep(NOW + timedelta(seconds=200))
    assert webhooks.published == [row.id, row.id]


# -- the commands --------------------------------------------------------------------------


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrations.upgrade(url)
    for name in list(os.environ):
        if name.startswith("MACAO_OCR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MACAO_OCR_DATABASE_URL", url)
    monkeypatch.setenv("MACAO_OCR_LOG_LEVEL", "WARNING")
    return url


def test_tenants_webhook_prints_the_secret_once(cli_db: str) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    runner = CliRunner()
    made = runner.invoke(
        app, ["tenants", "webhook", "acme", "--url", "https://8.8.8.8/h", "--json"]
    )
    assert made.exit_code == 0, made.output
    first = json.loads(made.stdout)
    assert first["tenant"] == "acme" and first["secret"].startswith("whsec_")
    moved = runner.invoke(
        app, ["tenants", "webhook", "acme", "--url", "https://8.8.4.4/h", "--json"]
    )
    assert json.loads(moved.stdout) == {"tenant": "acme", "url": "https://8.8.4.4/h"}
    rotated = runner.invoke(app, ["tenants", "webhook", "acme", "--rotate-secret", "--json"])
    out = json.loads(rotated.stdout)
    assert out["secret"] != first["secret"] and "previous_secret_expires_at" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tenants", "webhook", "acme", "--url", "http://10.0.0.7/h"], "not a public address"),
        (["tenants", "webhook", "acme"], "give --url"),
        (["webhooks", "redeliver", "nope"], "not a delivery id"),
        (["webhooks", "redeliver"], "give delivery ids or --failed"),
    ],
)
def test_commands_refuse_bad_input_naming_it(cli_db: str, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    with Session(sa.create_engine(cli_db)) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(WebhookEndpoint)) == 0
