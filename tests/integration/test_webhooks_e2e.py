"""Webhooks end to end: a real OCR worker and a real webhook worker (its own queue and
process) against the emulator, real Redis and PostgreSQL, and a receiver on a free port that
answers 500 for its first requests, then 200.

The receiver verifies every delivery's signature with the `standardwebhooks` library, gets
each job event and each batch event exactly as many times as the outbox recorded a 2xx
answer for it (once), and never sees a name, ID number, date or image.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from emulator.specimen import make_specimen
from models import Job, JobStatus, Result, WebhookAttempt, WebhookDelivery
from tests.fixtures.emulator import EmulatorProcess
from tests.fixtures.workers import StartWorkers, cli_env, sealer_for_tests, submit_jobs
from worker.broker.publish import WEBHOOK_QUEUE
from worker.producer import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PERMANENT = "FailedOperation.ImageNoSpecifiedCard"
FAILING_ANSWERS = 6  # the receiver's first answers are 500
DATA_KEYS = {"job_id", "status", "error_code", "batch", "tag"}


@dataclass
class Receipt:
    status: int  # what the receiver answered
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook endpoint: 500 for the first `failing` requests, then 200."""

    failing: int
    receipts: list[Receipt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            status = 500 if len(self.receipts) < self.failing else 200
            self.receipts.append(Receipt(status, headers, body))
            return status


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver(failing=FAILING_ANSWERS)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = state.answer({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/hooks/macao"
    server.shutdown()
    server.server_close()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "macao-ocr"
    return subprocess.run(
        [str(exe), *args], env=cli_env(env), capture_output=True, text=True, timeout=60
    )


def _submit(
    env: dict[str, str], factory: sessionmaker[Session], batch: str, n: int, seed: int
) -> list[uuid.UUID]:
    specs = [
        JobSpec(front=make_specimen(seed=seed + i).image, tag=f"{batch}-{i}") for i in range(n)
    ]
    return submit_jobs(env, factory, specs, batch=batch)


def _wait(what: str, check: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def _statuses(factory: sessionmaker[Session], ids: list[uuid.UUID]) -> set[JobStatus]:
    with factory() as session:
        return set(session.scalars(select(Job.status).where(Job.id.in_(ids))))


def test_every_event_is_signed_delivered_once_acknowledged_and_carries_no_personal_data(
    worker_env: dict[str, str],
    emulator: EmulatorProcess,
    celery_workers: StartWorkers,
    receiver: tuple[Receiver, str],
) -> None:
    state, url = receiver
    env = dict(
        worker_env,
        MACAO_OCR_WEBHOOK_ALLOW_PRIVATE="true",
        MACAO_OCR_WEBHOOK_BACKOFF_BASE_S="0.2",
        MACAO_OCR_WEBHOOK_BACKOFF_MAX_S="1.0",
        MACAO_OCR_WEBHOOK_TIMEOUT_S="5",
    )
    # Without the allowance a loopback receiver is refused, naming the rule.
    refused = _cli(worker_env, "tenants", "webhook", "default", "--url", url)
    assert refused.returncode == 2
    assert "not a public address" in refused.stderr
    made = _cli(env, "tenants", "webhook", "default", "--url", url, "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    assert secret.startswith("whsec_")

    celery_workers(env, n=1, concurrency=10)
    celery_workers(env, n=1, concurrency=4, queues=WEBHOOK_QUEUE)
    engine = sa.create_engine(env["MACAO_OCR_DATABASE_URL"])
    factory = sessionmaker(engine, expire_on_commit=False)
    try:
        good = _submit(env, factory, "batch-good", 4, seed=500)
        _wait("the good batch", lambda: _statuses(factory, good) == {JobStatus.succeeded})
        emulator.configure(force_error_code=PERMANENT)
        bad = _submit(env, factory, "batch-bad", 2, seed=600)
        _wait("the bad batch", lambda: _statuses(factory, bad) == {JobStatus.failed})

        def all_delivered() -> bool:
            with factory() as session:
                rows = list(session.scalars(select(WebhookDelivery)))
            return len(rows) == 8 and all(r.status.value == "delivered" for r in rows)

        _wait("every delivery acknowledged", all_delivered)
        with factory() as session:
            deliveries = {d.id: d for d in session.scalars(select(WebhookDelivery))}
            attempts = list(session.scalars(select(WebhookAttempt)))
            results = list(session.scalars(select(Result)))
    finally:
        engine.dispose()

    # The outbox: one job event per job, one batch event per batch.
    events = sorted((d.event_type, str(d.job_id or d.batch)) for d in deliveries.values())
    assert events == sorted(
        [("job.succeeded", str(i)) for i in good]
        + [("job.failed", str(i)) for i in bad]
        + [("batch.completed", "batch-good"), ("batch.completed", "batch-bad")]
    )

    # Every receipt is signed (verified by the specification's library), and matches an
    # attempt the outbox recorded with the same answer.
    hook = Webhook(secret)
    by_id: dict[str, list[Receipt]] = {}
    for receipt in state.receipts:
        payload = hook.verify(receipt.body, receipt.headers)
        assert set(payload) == {"type", "timestamp", "data"}
        by_id.setdefault(receipt.headers["webhook-id"], []).append(receipt)
    assert sum(r.status == 500 for r in state.receipts) == FAILING_ANSWERS
    for delivery_id, delivery in deliveries.items():
        got = by_id.get(f"msg_{delivery_id.hex}", [])
        recorded = [a for a in attempts if a.delivery_id == delivery_id]
        acked = [a for a in recorded if a.status_code == 200]
        assert len(acked) == 1
        assert sum(r.status == 200 for r in got) == len(acked)
        assert sorted(r.status for r in got) == sorted(a.status_code or 0 for a in recorded)
        assert delivery.attempts == len(recorded)
        # Each attempt's body is the same message.
        assert len({r.body for r in got}) == 1
        body = json.loads(got[0].body)
        assert body["type"] == delivery.event_type
        if delivery.event_type == "batch.completed":
            assert body["data"] == {"batch": delivery.batch, "status": "completed"}
        elif delivery.event_type == "job.succeeded":
            # A succeeded job's decision rides along, as codes (the specimen cards are clear
            # or carry only warning codes).
            assert set(body["data"]) == DATA_KEYS | {"decision", "reasons"}
            assert body["data"]["decision"] in ("clear", "consider", "reject")
            assert all(isinstance(code, str) for code in body["data"]["reasons"])
            assert body["data"]["job_id"] == str(delivery.job_id)
            assert body["data"]["error_code"] is None
        else:
            assert set(body["data"]) == DATA_KEYS
            assert body["data"]["job_id"] == str(delivery.job_id)
            expected_code = PERMANENT if delivery.event_type == "job.failed" else None
            assert body["data"]["error_code"] == expected_code
    # Retried after the 500s: some delivery took more than one attempt.
    assert any(d.attempts > 1 for d in deliveries.values())

    # No personal data in anything the receiver got.
    everything = b"\n".join(r.body for r in state.receipts).decode()
    assert len(results) == len(good)
    for row in results:
        result = sealer_for_tests().open_result(row)
        for value in (
            result.cn_last_name,
            result.en_last_name,
            result.cn_first_name,
            result.en_first_name,
            result.id_number,
        ):
            if value:
                assert value not in everything
        for day in (result.birthday, result.first_issue_date, result.current_issue_date):
            if day is not None:
                assert day.isoformat() not in everything
    assert "/9j/" not in everything and "iVBOR" not in everything  # no base64 JPEG/PNG

    # The operator's view agrees: nothing failing, everything listed.
    listed = _cli(env, "webhooks", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["delivery_id"] for r in rows} == {str(i) for i in deliveries}
    assert _cli(env, "webhooks", "list", "--failed", "--json").stdout.strip() == ""
