"""Decisions end to end: specimen cards built to trip each warning and each check go through
`macao-ocr submit` → a real Celery worker → the emulator → PostgreSQL; then a policy change
and `macao-ocr decide` change stored decisions with zero API calls (the emulator's counters
are the witness)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from emulator.specimen import make_specimen
from models import TERMINAL_STATUSES, Job, JobEvent, JobStatus
from tests.fixtures.workers import StartWorkers, cli_env
from worker.decision.engine import MACAO_TZ

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MACAO_OCR = str(Path(sys.executable).parent / "macao-ocr")


def dmy(day: date) -> str:
    return day.strftime("%d-%m-%Y")


@dataclass(frozen=True)
class Case:
    tag: str
    decision: str
    reasons: tuple[str, ...]
    warnings: tuple[str | int, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)
    same_back: bool = False


def cases(today: date) -> list[Case]:
    """One card per warning and per check, a clean card, and their expected outcome under
    the default policy (MACAO_OCR_MIN_AGE=18 for this deployment)."""
    child_birth = today - timedelta(days=365 * 10)
    return [
        Case("clean", "clear", ()),
        Case("covered", "consider", ("covered",), warnings=("covered",)),
        Case("photocopy", "reject", ("photocopy",), warnings=("photocopy",)),
        Case("recapture", "consider", ("screen_recapture",), warnings=("screen_recapture",)),
        Case("tampered", "reject", ("tampered",), warnings=("tampered",)),
        Case("glare", "consider", ("glare",), warnings=("glare",)),
        Case("blurry", "consider", ("blurry",), warnings=("blurry",)),
        Case("unknown", "consider", ("unknown_-9105",), fields={"WarnCardInfos": [-9105]}),
        Case("missing", "consider", ("field_missing",), fields={"ID": ""}),
        Case("format", "consider", ("id_number_format",), fields={"ID": "9234567(8)"}),
        Case("unreadable", "consider", ("date_unreadable",), fields={"Birthday": "31-02-1990"}),
        Case("order", "consider", ("dates_out_of_order",), fields={"FirstIssueDate": "01-01-1901"}),
        Case(
            "expired",
            "reject",
            ("card_expired",),
            fields={"ValidityPeriod": dmy(today - timedelta(days=3))},
        ),
        Case(
            "expiring",
            "consider",
            ("card_expiring",),
            fields={"ValidityPeriod": dmy(today + timedelta(days=10))},
        ),
        Case("old", "reject", ("age_impossible",), fields={"Birthday": "01-01-1890"}),
        Case(
            "child",
            "reject",
            ("age_below_minimum",),
            fields={
                "Birthday": dmy(child_birth),
                "FirstIssueDate": dmy(child_birth + timedelta(days=400)),
                "CurrentIssueDate": dmy(today - timedelta(days=100)),
                "ValidityPeriod": dmy(today + timedelta(days=1500)),
            },
        ),
        Case("sex", "consider", ("sex_value",), fields={"Sex": "X", "Symbol": "A"}),
        Case("resident", "consider", ("resident_type_value",), fields={"ResidentType": "Tourist"}),
        Case("symbol", "consider", ("symbol_format",), fields={"Symbol": "AZ"}),
        Case("mismatch", "consider", ("symbol_sex_mismatch",), fields={"Sex": "M", "Symbol": "AF"}),
        Case(
            "noexpiry", "consider", ("no_expiry_under_60",), fields={"ValidityPeriod": "永久有效"}
        ),
        Case("sides", "consider", ("sides_identical",), same_back=True),
    ]


def run_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACAO_OCR, *args], env=cli_env(env), capture_output=True, text=True, timeout=120
    )


def json_lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def write_cards(folder: Path, all_cases: Sequence[Case], today: date) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["front", "back", "tag"])
    for i, case in enumerate(all_cases):
        spec = make_specimen(
            4000 + i, warnings=case.warnings, valid_on=today, fields=case.fields or None
        )
        name = f"{case.tag}.jpg"
        (folder / name).write_bytes(spec.image)
        writer.writerow([name, name if case.same_back else "", case.tag])
    manifest = folder / "cards.csv"
    manifest.write_text(buf.getvalue())
    return manifest


def wait_terminal(engine: sa.Engine, ids: Sequence[uuid.UUID], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with Session(engine) as session:
            jobs = list(session.scalars(sa.select(Job).where(Job.id.in_(ids))))
        if len(jobs) == len(ids) and all(j.status in TERMINAL_STATUSES for j in jobs):
            assert {j.status for j in jobs} == {JobStatus.succeeded}
            return
        if time.monotonic() > deadline:
            pytest.fail(f"jobs not terminal: {sorted(str(j.status) for j in jobs)}")
        time.sleep(0.5)


@pytest.fixture
def db(worker_env: dict[str, str]) -> Iterator[sa.Engine]:
    engine = sa.create_engine(worker_env["MACAO_OCR_DATABASE_URL"])
    yield engine
    engine.dispose()


def test_each_warning_and_check_decides_and_decide_recomputes_without_calls(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    env = {**worker_env, "MACAO_OCR_MIN_AGE": "18"}
    today = datetime.now(MACAO_TZ).date()
    all_cases = cases(today)
    manifest = write_cards(tmp_path / "cards", all_cases, today)
    celery_workers(env, n=1, concurrency=20)
    submitted = json_lines(
        run_cli(env, "submit", "--manifest", str(manifest), "--batch", "e2e", "--json")
    )
    by_tag = {row["tag"]: uuid.UUID(row["job_id"]) for row in submitted}
    wait_terminal(db, list(by_tag.values()), timeout_s=120)

    views = {
        v["tag"]: v
        for v in json_lines(run_cli(env, "jobs", "--batch", "e2e", "--json", "--limit", "100"))
    }
    for case in all_cases:
        view = views[case.tag]
        got = (view["decision"], tuple(r["code"] for r in view["reasons"]))
        assert got == (case.decision, case.reasons), case.tag
        for reason in view["reasons"]:
            assert reason["source"] == (
                "warning" if case.warnings or case.tag == "unknown" else "check"
            )
    # No personal data in any detail.
    details = " ".join(r["detail"] for v in views.values() for r in v["reasons"])
    for v in views.values():
        result = v["result"]
        for key in ("id_number", "birthday", "en_last_name"):
            if result[key] and len(str(result[key])) > 3:
                assert str(result[key]) not in details, key
    assert "1890" not in details and "9234567" not in details

    rejected = {
        v["tag"]
        for v in json_lines(
            run_cli(env, "jobs", "--decision", "reject", "--json", "--limit", "100")
        )
    }
    assert rejected == {c.tag for c in all_cases if c.decision == "reject"}
    photocopies = json_lines(run_cli(env, "jobs", "--reason", "photocopy", "--json"))
    assert [v["tag"] for v in photocopies] == ["photocopy"]
    status = json_lines(run_cli(env, "status", str(by_tag["expired"]), "--json"))[0]
    assert status["decision"] == "reject" and status["reasons"][0]["code"] == "card_expired"

    # A policy change rewrites nothing; `decide` does, with no API call.
    calls_before = emulator.counters()["total"]
    assert calls_before == len(all_cases)
    changed = run_cli(
        env,
        "tenants",
        "policy",
        "default",
        "--consider",
        "photocopy,card_expired",
        "--ignore",
        "glare",
    )
    assert changed.returncode == 0, changed.stderr
    again = {
        v["tag"]: v
        for v in json_lines(run_cli(env, "jobs", "--batch", "e2e", "--json", "--limit", "100"))
    }
    assert again["photocopy"]["decision"] == "reject"
    assert again["glare"]["decision"] == "consider"

    dry = run_cli(env, "decide", "--batch", "e2e", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["changed"] == 3
    report = run_cli(
        env,
        "decide",
        "--batch",
        "e2e",
        "--reason",
        "photocopies reviewed",
        "--actor",
        "ops",
        "--json",
    )
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert (summary["matched"], summary["changed"]) == (len(all_cases), 3)
    after = {
        v["tag"]: v
        for v in json_lines(run_cli(env, "jobs", "--batch", "e2e", "--json", "--limit", "100"))
    }
    assert after["photocopy"]["decision"] == "consider"
    assert after["expired"]["decision"] == "consider"
    assert (after["glare"]["decision"], after["glare"]["reasons"]) == ("clear", [])
    for tag in set(after) - {"photocopy", "expired", "glare"}:
        assert after[tag]["decision"] == views[tag]["decision"], tag
    assert emulator.counters()["total"] == calls_before
    with Session(db) as session:
        events = session.scalars(sa.select(JobEvent).where(JobEvent.kind == "decided")).all()
        assert {e.job_id for e in events} == {by_tag[t] for t in ("photocopy", "expired", "glare")}
        assert all(e.actor == "ops" and "photocopies reviewed" in (e.reason or "") for e in events)

    # -9109: the account has no warning service; not a card defect, ignored by default.
    emulator.configure(warning_service_disabled=True)
    spec = make_specimen(4999, warnings=("tampered",), valid_on=today)
    card = tmp_path / "no-service.jpg"
    card.write_bytes(spec.image)
    [row] = json_lines(run_cli(env, "submit", str(card), "--batch", "e2e-9109", "--json"))
    job_id = uuid.UUID(row["job_id"])
    wait_terminal(db, [job_id], timeout_s=60)
    view = json_lines(run_cli(env, "status", str(job_id), "--json"))[0]
    assert view["result"]["warning_service_disabled"] is True
    assert (view["decision"], view["warnings"], view["reasons"]) == ("clear", [], [])
