"""End to end with real processes: `macao-ocr submit` (CLI subprocess) → Redis → real
`celery worker` processes → the emulator over HTTP → PostgreSQL. The emulator's counters are
the server-side witness of how many calls were made."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from emulator.specimen import make_specimen
from models import TERMINAL_STATUSES, Attempt, Job, JobStatus, Result, Warning
from tests.fixtures.workers import (
    KEY_VARIABLES,
    TEST_DEFAULTS,
    StartWorkers,
    clean_environ,
    cli_env,
    sealer_for_tests,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MACAO_OCR = str(Path(sys.executable).parent / "macao-ocr")
TEXT_FIELDS = {
    "CnLastName": "cn_last_name",
    "EnLastName": "en_last_name",
    "LastNameCode": "last_name_code",
    "CnFirstName": "cn_first_name",
    "EnFirstName": "en_first_name",
    "FirstNameCode": "first_name_code",
    "ID": "id_number",
    "Sex": "sex",
    "Symbol": "symbol",
    "ResidentType": "resident_type",
    "ValidityPeriod": "validity_period_text",
}
DATE_FIELDS = {
    "Birthday": "birthday",
    "FirstIssueDate": "first_issue_date",
    "CurrentIssueDate": "current_issue_date",
}
WARNING_SETS: list[tuple[str, ...]] = [
    (),
    ("photocopy",),
    ("glare", "blurry"),
    (),
    ("screen_recapture",),
    ("covered", "tampered"),
]


@dataclass(frozen=True)
class Card:
    path: Path
    truth: dict[str, Any]
    sha256: str


def write_cards(folder: Path, n: int, seed: int) -> list[Card]:
    """`n` specimen cards with a mix of warnings and no-expiry validity."""
    folder.mkdir(parents=True, exist_ok=True)
    cards = []
    for i in range(n):
        spec = make_specimen(
            seed + i, warnings=WARNING_SETS[i % len(WARNING_SETS)], no_expiry=(i % 7 == 3)
        )
        path = folder / f"card-{i:03d}.jpg"
        path.write_bytes(spec.image)
        cards.append(Card(path, spec.truth, hashlib.sha256(spec.image).hexdigest()))
    return cards


def write_manifest(path: Path, cards: Sequence[Card]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["front", "tag"])
    for i, card in enumerate(cards):
        writer.writerow([card.path.name, f"card-{i}"])
    path.write_text(buf.getvalue())
    return path


def run_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACAO_OCR, *args], env=cli_env(env), capture_output=True, text=True, timeout=120
    )


def submit_manifest(env: Mapping[str, str], manifest: Path) -> dict[str, uuid.UUID]:
    """Submit through the CLI; returns tag → job id."""
    proc = run_cli(env, "submit", "--manifest", str(manifest), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {row["tag"]: uuid.UUID(row["job_id"]) for row in rows}


@pytest.fixture
def db(worker_env: dict[str, str]) -> Iterator[sa.Engine]:
    engine = sa.create_engine(worker_env["MACAO_OCR_DATABASE_URL"])
    yield engine
    engine.dispose()


def wait_terminal(engine: sa.Engine, ids: Sequence[uuid.UUID], timeout_s: float) -> list[Job]:
    """Poll until every job is succeeded or failed; fail with a status summary otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        with Session(engine) as session:
            jobs = list(session.scalars(sa.select(Job).where(Job.id.in_(ids))))
        if len(jobs) == len(ids) and all(j.status in TERMINAL_STATUSES for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            summary: dict[str, int] = {}
            for j in jobs:
                summary[j.status.value] = summary.get(j.status.value, 0) + 1
            pytest.fail(f"jobs not terminal after {timeout_s}s: {summary}", pytrace=False)
        time.sleep(0.5)


def assert_result_matches_truth(
    row: Result, warnings: list[Warning], truth: dict[str, Any]
) -> None:
    result = sealer_for_tests().open_result(row)
    for api_name, column in TEXT_FIELDS.items():
        assert getattr(result, column) == (truth[api_name] or None), api_name
    for api_name, column in DATE_FIELDS.items():
        expected = datetime.strptime(truth[api_name], "%d-%m-%Y").date()
        assert getattr(result, column) == expected, api_name
    validity = truth["ValidityPeriod"]
    try:
        expected_validity = datetime.strptime(validity, "%d-%m-%Y").date()
    except ValueError:
        expected_validity = None  # no expiry (holder aged 60+): kept as text only
    assert result.validity_period == expected_validity
    assert result.height_m == Decimal(truth["Height"])
    assert sorted(w.code for w in warnings) == sorted(truth["WarnCardInfos"])
    assert result.request_id


def test_fifty_cards_through_two_worker_processes(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    cards = write_cards(tmp_path / "cards", 50, seed=1000)
    workers = celery_workers(worker_env, n=2, concurrency=20)
    by_tag = submit_manifest(worker_env, write_manifest(tmp_path / "cards" / "m.csv", cards))
    assert len(by_tag) == 50

    jobs = wait_terminal(db, list(by_tag.values()), timeout_s=90)
    assert {j.status for j in jobs} == {JobStatus.succeeded}
    with Session(db) as session:
        for i, card in enumerate(cards):
            job_id = by_tag[f"card-{i}"]
            result = session.get(Result, job_id)
            assert result is not None
            warnings = list(session.scalars(sa.select(Warning).where(Warning.job_id == job_id)))
            assert_result_matches_truth(result, warnings, card.truth)
        # Both processes took work: one loop each, many calls in flight.
        hosts = set(session.scalars(sa.select(Attempt.worker_host).distinct()))
        assert len(hosts) == 2, hosts
        assert session.scalar(sa.select(sa.func.count()).select_from(Attempt)) == 50

    counters = emulator.counters()
    assert counters["total"] == 50 and counters["ok"] == 50
    assert all(counters["by_image_sha256"].get(c.sha256) == 1 for c in cards)

    # Every API call is logged once, as JSON with the job id and no personal data.
    calls = [
        json.loads(line)
        for line in workers.log_lines()
        if line.startswith("{") and '"api_call"' in line
    ]
    assert len(calls) == 50
    assert {c["job_id"] for c in calls} == {str(i) for i in by_tag.values()}
    text = workers.log_text()
    for card in cards[:10]:
        assert card.truth["ID"] not in text
        assert card.truth["EnFirstName"] not in text


def test_bad_inputs_are_refused_at_submit_and_never_called(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    celery_workers(worker_env, n=1, concurrency=5)
    gif = tmp_path / "card.gif"
    PILImage.new("RGB", (40, 30), "white").save(gif, format="GIF")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text_file = tmp_path / "notes.jpg"
    text_file.write_bytes(b"hello, not an image")

    for bad, rule in ((gif, "gif"), (empty, "empty"), (text_file, "png")):
        proc = run_cli(worker_env, "submit", str(bad), "--json")
        assert proc.returncode != 0
        assert rule in proc.stderr.lower(), proc.stderr
        assert str(bad.name) in proc.stderr or "front" in proc.stderr.lower()

    # A manifest with one bad row refuses every row.
    [good] = write_cards(tmp_path / "ok", 1, seed=77)
    manifest = tmp_path / "mixed.csv"
    manifest.write_text(f"front,tag\n{good.path},good\n{gif},bad\n")
    proc = run_cli(worker_env, "submit", "--manifest", str(manifest), "--json")
    assert proc.returncode != 0 and "gif" in proc.stderr.lower()

    with Session(db) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0

    # Control: a good card goes through, so the silence above is not a dead pipeline.
    proc = run_cli(worker_env, "submit", str(good.path), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = uuid.UUID(json.loads(proc.stdout.splitlines()[0])["job_id"])
    [job] = wait_terminal(db, [job_id], timeout_s=30)
    assert job.status is JobStatus.succeeded
    counters = emulator.counters()
    assert counters["total"] == 1
    assert list(counters["by_image_sha256"]) == [good.sha256]


def test_injected_transient_faults_are_retried_until_success(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    emulator.configure(ocr_failed=0.15, download_error=0.15)
    cards = write_cards(tmp_path / "cards", 30, seed=2000)
    # DownLoadError has a budget of its own (3 by default): at 15 % a job of 30 would run
    # out of it now and then; this test is about retries until success.
    env = {
        **worker_env,
        "MACAO_OCR_MAX_ATTEMPTS": "12",
        "MACAO_OCR_DOWNLOAD_MAX_ATTEMPTS": "12",
    }
    celery_workers(env, n=2, concurrency=10)
    by_tag = submit_manifest(env, write_manifest(tmp_path / "cards" / "m.csv", cards))

    jobs = wait_terminal(db, list(by_tag.values()), timeout_s=120)
    assert {j.status for j in jobs} == {JobStatus.succeeded}
    counters = emulator.counters()
    faults = counters["by_code"]
    assert faults.get("FailedOperation.OcrFailed", 0) > 0
    assert faults.get("FailedOperation.DownLoadError", 0) > 0
    assert counters["ok"] == 30
    with Session(db) as session:
        codes = list(session.scalars(sa.select(Attempt.outcome_code)))
        # Every call the emulator saw is an attempt row, and vice versa.
        assert len(codes) == counters["total"]
        assert codes.count("OK") == 30
        retried = [j for j in jobs if j.api_calls > 1]
        assert retried, "no job met a fault: the test proves nothing"
        for job in retried:
            assert job.attempts == job.api_calls  # transient faults spend budget
            assert job.last_error_code in {
                "FailedOperation.OcrFailed",
                "FailedOperation.DownLoadError",
            }


def test_permanent_error_fails_after_exactly_one_call(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    photo = tmp_path / "holiday.jpg"
    PILImage.new("RGB", (320, 200), (30, 120, 200)).save(photo, format="JPEG")
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    celery_workers(worker_env, n=1, concurrency=5)
    proc = run_cli(worker_env, "submit", str(photo), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = uuid.UUID(json.loads(proc.stdout.splitlines()[0])["job_id"])

    [job] = wait_terminal(db, [job_id], timeout_s=30)
    assert job.status is JobStatus.failed
    assert job.last_error_code == "FailedOperation.ImageNoSpecifiedCard"
    assert job.api_calls == 1
    time.sleep(1.0)  # a stray retry would show up here
    assert emulator.counters()["by_image_sha256"] == {digest: 1}
    status = run_cli(worker_env, "status", str(job_id), "--json")
    view = json.loads(status.stdout.splitlines()[0])
    assert view["status"] == "failed"
    assert view["error_code"] == "FailedOperation.ImageNoSpecifiedCard"


def test_one_process_keeps_a_hundred_slow_calls_in_flight(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    """One OS process, one event loop: 100 calls of ~1 s each overlap instead of queueing."""
    emulator.configure(latency_median_ms=1000, latency_sigma=0.05)
    [card] = write_cards(tmp_path / "cards", 1, seed=9)
    manifest = write_manifest(tmp_path / "cards" / "m.csv", [card] * 100)
    celery_workers(worker_env, n=1, concurrency=100)
    by_tag = submit_manifest(worker_env, manifest)
    jobs = wait_terminal(db, list(by_tag.values()), timeout_s=60)
    assert {j.status for j in jobs} == {JobStatus.succeeded}

    with Session(db) as session:
        spans = [
            (a.started_at, a.finished_at)
            for a in session.scalars(sa.select(Attempt).where(Attempt.outcome_code == "OK"))
        ]
    assert len(spans) == 100
    edges = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans if f is not None])
    in_flight = peak = 0
    for _, step in edges:
        in_flight += step
        peak = max(peak, in_flight)
    assert all(f is not None and (f - s).total_seconds() >= 0.8 for s, f in spans)
    assert peak >= 50, peak  # serially this would take 100 s; here dozens overlap
    assert len({j.worker_host for j in jobs}) == 1


def test_launcher_runs_supervises_and_stops_its_processes(
    worker_env: dict[str, str], clean_redis: str, tmp_path: Path
) -> None:
    """`macao-ocr worker --processes 2`: two OCR nodes and the webhook node answer, a killed
    child is replaced, and SIGTERM stops everything."""
    from celery import Celery

    log = (tmp_path / "launcher.log").open("wb")
    launcher = subprocess.Popen(
        [MACAO_OCR, "worker", "--processes", "2", "--concurrency", "4"],
        env=cli_env(worker_env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    app = Celery("ping", broker=clean_redis, set_as_current=False)
    try:
        nodes = _wait_nodes(app, 3, timeout_s=60)
        assert sorted(n.split("@")[0] for n in nodes) == [
            "macao-ocr-1",
            "macao-ocr-2",
            "macao-ocr-webhooks",
        ]
        pids = {reply["pid"] for reply in _stats(app).values()}
        assert len(pids) == 3
        victim = next(iter(pids))
        import os

        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            current = {reply["pid"] for reply in _stats(app).values()}
            if len(current) == 3 and victim not in current:
                break
            assert time.monotonic() < deadline, "killed worker was not replaced"
            time.sleep(1)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
        assert _stats(app) == {}
    finally:
        if launcher.poll() is None:
            import os

            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
        app.close()
        log.close()


def _wait_nodes(app: Any, n: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0)
        nodes = [name for reply in replies for name in reply]
        if len(nodes) >= n:
            return nodes
        time.sleep(0.5)
    pytest.fail(f"fewer than {n} worker nodes answered", pytrace=False)


def _stats(app: Any) -> dict[str, Any]:
    stats = app.control.inspect(timeout=1.5).stats()
    return dict(stats or {})


def test_workers_refuse_to_start_without_credentials(tmp_path: Path) -> None:
    """No credentials: the launcher and a bare `celery worker` both exit naming the variable
    (a worker that takes jobs it can never call for would only burn them)."""
    env = clean_environ()
    env["MACAO_OCR_BROKER_URL"] = "redis://127.0.0.1:1/0"  # never reached
    env["MACAO_OCR_DATABASE_URL"] = f"sqlite:///{tmp_path / 'x.db'}"
    # Keys present: the credentials are what is missing (keys: tests/unit/test_privacy_seal.py).
    env.update({name: TEST_DEFAULTS[name] for name in KEY_VARIABLES})
    launcher = subprocess.run(
        [MACAO_OCR, "worker", "--processes", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert launcher.returncode == 2
    assert "TENCENTCLOUD_SECRET_ID" in launcher.stderr
    bare = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "threads"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bare.returncode != 0
    assert "TENCENTCLOUD_SECRET_ID" in bare.stdout + bare.stderr
