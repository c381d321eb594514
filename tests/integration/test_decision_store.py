"""Decisions through the pipeline and the store (PostgreSQL, both ways a worker writes; and
SQLite), `decide` recomputing stored decisions, and the CLI faces (tenants policy, jobs
filters, status)."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

import migrations
from models import DecisionReason, Job, JobEvent, JobStatus, Result
from models.base import utcnow
from tests.fixtures.workers import sealed_job, sealer_for_tests
from tests.integration import test_pipeline
from tests.integration.test_pipeline import Harness, ok_result
from worker.cli import app
from worker.decision.policy import Policy
from worker.decision.redecide import redecide
from worker.decision.store import load_overrides, save_overrides
from worker.pipeline import Outcome
from worker.reason_codes import Effect
from worker.store import job_sql
from worker.store.views import job_view

# The pipeline's harness (fixtures of test_pipeline, shared by name).
harness = test_pipeline.harness
loop_thread = test_pipeline.loop_thread
settings = test_pipeline.settings


def stored(sessions: sessionmaker[Session], job_id: uuid.UUID) -> tuple[str | None, list[str]]:
    with sessions() as session:
        result = session.get_one(Result, job_id)
        reasons = session.scalars(
            select(DecisionReason.code)
            .where(DecisionReason.job_id == job_id)
            .order_by(DecisionReason.id)
        ).all()
        return result.decision, list(reasons)


def test_the_worker_stores_the_decision_with_the_result(harness: Harness) -> None:
    job_id = harness.add_job()
    assert harness.run(job_id) is Outcome.succeeded
    # ok_result(): photocopy and glare on an otherwise sound card.
    assert stored(harness.sessions, job_id) == ("reject", ["photocopy", "glare"])
    with harness.sessions() as session:
        view = job_view(session, session.get_one(Job, job_id), sealer=sealer_for_tests())
        assert session.get_one(Result, job_id).decided_at is not None
    assert view["decision"] == "reject"
    assert view["reasons"] == [
        {"code": "photocopy", "source": "warning", "detail": "WarnCardInfos -9102"},
        {"code": "glare", "source": "warning", "detail": "WarnCardInfos -9107"},
    ]


def test_the_tenant_policy_decides(harness: Harness) -> None:
    seen: list[str] = []

    def policies(tenant: str) -> Policy:
        seen.append(tenant)
        return Policy(stored={"photocopy": Effect.ignore})

    harness.deps = replace(harness.deps, policies=policies)
    job_id = harness.add_job(tenant="acme")
    assert harness.run(job_id) is Outcome.succeeded
    assert seen == ["acme"]
    assert stored(harness.sessions, job_id) == ("consider", ["glare"])


def test_checks_run_on_the_answer(harness: Harness) -> None:
    expired = replace(
        ok_result(),
        warnings=(),
        validity_period=date(2020, 1, 1),
        validity_period_text="01-01-2020",
        id_number="9234567(8)",
        birthday=None,
        unreadable=("birthday",),
    )
    harness.client.script.append(expired)
    job_id = harness.add_job(back_url="https://cards.example.com/front.jpg")
    assert harness.run(job_id) is Outcome.succeeded
    decision, codes = stored(harness.sessions, job_id)
    assert decision == "reject"
    assert codes == [
        "id_number_format",
        "date_unreadable",
        "card_expired",
        "sides_identical",
    ]
    with harness.sessions() as session:
        assert session.get_one(Result, job_id).unreadable_fields == "birthday"


def test_a_decision_that_cannot_be_made_never_loses_the_result(harness: Harness) -> None:
    def broken(tenant: str) -> Policy:
        raise RuntimeError("corrupt policy")

    harness.deps = replace(harness.deps, policies=broken)
    job_id = harness.add_job()
    assert harness.run(job_id) is Outcome.succeeded
    assert harness.job(job_id).status is JobStatus.succeeded
    assert stored(harness.sessions, job_id) == (None, [])


def test_decide_recomputes_after_a_policy_change_and_records_it(harness: Harness) -> None:
    first = harness.add_job(batch="b1")
    second = harness.add_job(batch="b1")
    other_batch = harness.add_job(batch="b2")
    for job_id in (first, second, other_batch):
        assert harness.run(job_id) is Outcome.succeeded
    calls = len(harness.client.calls)
    with harness.sessions() as session, session.begin():
        save_overrides(
            session.connection(),
            "default",
            {"photocopy": Effect.consider, "glare": Effect.ignore},
            actor="test",
            now=utcnow(),
        )
    # A policy change alone rewrites nothing.
    assert stored(harness.sessions, first) == ("reject", ["photocopy", "glare"])

    config = harness.deps.settings
    dry = redecide(
        harness.sessions,
        config,
        tenant="default",
        batch="b1",
        actor="t",
        dry_run=True,
        sealer=sealer_for_tests(),
    )
    assert (dry.matched, len(dry.changed)) == (2, 2)
    assert stored(harness.sessions, first) == ("reject", ["photocopy", "glare"])

    report = redecide(
        harness.sessions,
        config,
        tenant="default",
        batch="b1",
        actor="ops",
        reason="new policy",
        sealer=sealer_for_tests(),
    )
    assert (report.matched, len(report.changed)) == (2, 2)
    assert report.changed[0].before == "reject" and report.changed[0].after == "consider"
    for job_id in (first, second):
        assert stored(harness.sessions, job_id) == ("consider", ["photocopy"])
    assert stored(harness.sessions, other_batch) == ("reject", ["photocopy", "glare"])
    assert len(harness.client.calls) == calls  # no API call
    with harness.sessions() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == first)).all()
        [event] = [e for e in events if e.kind == "decided"]
        assert event.actor == "ops"
        assert event.reason == "new policy; decision reject -> consider"
        view = job_view(
            session, session.get_one(Job, first), history=True, sealer=sealer_for_tests()
        )
        assert any(h.get("kind") == "decided" for h in view["history"])
    # Nothing left to change: no new event.
    again = redecide(
        harness.sessions,
        config,
        tenant="default",
        batch="b1",
        actor="ops",
        sealer=sealer_for_tests(),
    )
    assert (again.matched, len(again.changed)) == (2, 0)
    # Another tenant's policy does not apply; another tenant's jobs are not touched.
    none = redecide(
        harness.sessions, config, tenant="acme", batch="b1", actor="ops", sealer=sealer_for_tests()
    )
    assert none.matched == 0


def test_decide_needs_a_selection(harness: Harness) -> None:
    from worker.errors import InputError

    with pytest.raises(InputError):
        redecide(
            harness.sessions,
            harness.deps.settings,
            tenant="default",
            actor="x",
            sealer=sealer_for_tests(),
        )


def test_store_success_on_sqlite_keeps_the_decision(tmp_path: Path) -> None:
    from worker.decision.apply import decide_answer
    from worker.decision.checks import Limits

    url = f"sqlite:///{tmp_path / 'd.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    try:
        with Session(engine) as session, session.begin():
            job = sealed_job(front_url="https://x.invalid/a.jpg", status=JobStatus.running)
            session.add(job)
            session.flush()
            job_id = job.id
            job_sql.insert_attempt(session.connection(), job_id, 1, now=utcnow(), host="h")
        result = ok_result()
        decision = decide_answer(
            result, Policy(), sides_identical=False, read_at=utcnow(), limits=Limits()
        )
        call = job_sql.CallRecord(utcnow(), utcnow(), "OK", None, "r", 5)
        with engine.begin() as conn:
            job_sql.store_success(
                conn, job_id, 1, call, result, False, decision, sealer=sealer_for_tests()
            )
        sessions = sessionmaker(engine, expire_on_commit=False)
        assert stored(sessions, job_id) == ("reject", ["photocopy", "glare"])
        with engine.begin() as conn:
            save_overrides(conn, "default", {"glare": Effect.reject}, actor="t", now=utcnow())
            assert load_overrides(conn, "default") == {"glare": Effect.reject}
            save_overrides(conn, "default", {}, actor="t", now=utcnow())
            assert load_overrides(conn, "default") == {}
    finally:
        engine.dispose()


# -- the CLI


@pytest.fixture
def cli_db(tmp_path: Path, restore_logging: None) -> tuple[dict[str, str], sa.Engine]:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrations.upgrade(url)
    env = {"MACAO_OCR_DATABASE_URL": url, "MACAO_OCR_TENANT": "acme", "MACAO_OCR_LOG_JSON": "true"}
    return env, sa.create_engine(url)


def invoke(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def _succeeded(engine: sa.Engine, decision: str, codes: list[str], tenant: str = "acme") -> str:
    with Session(engine) as session, session.begin():
        job = sealed_job(
            tenant=tenant, front_url="https://x.invalid/a.jpg", status=JobStatus.succeeded
        )
        session.add(job)
        session.flush()
        session.add(Result(job_id=job.id, request_id="r", decision=decision, decided_at=utcnow()))
        session.flush()
        session.add_all(
            DecisionReason(job_id=job.id, code=c, source="warning", detail="d") for c in codes
        )
        return str(job.id)


def test_jobs_filters_by_decision_and_reason(cli_db: tuple[dict[str, str], sa.Engine]) -> None:
    env, engine = cli_db
    rejected = _succeeded(engine, "reject", ["photocopy", "glare"])
    considered = _succeeded(engine, "consider", ["glare"])
    cleared = _succeeded(engine, "clear", [])
    _succeeded(engine, "reject", ["photocopy"], tenant="other")

    def ids(*args: str) -> set[str]:
        out = invoke(env, "jobs", "--json", *args)
        assert out.exit_code == 0, out.output
        return {json.loads(line)["job_id"] for line in out.stdout.splitlines() if line.strip()}

    assert ids("--decision", "reject") == {rejected}
    assert ids("--reason", "glare") == {rejected, considered}
    assert ids("--decision", "consider", "--reason", "glare") == {considered}
    assert ids("--decision", "clear") == {cleared}
    bad = invoke(env, "jobs", "--reason", "photcopy")
    assert bad.exit_code == 2 and "unknown code 'photcopy'" in bad.output
    table = invoke({**env, "COLUMNS": "240"}, "jobs", "--decision", "reject")
    assert "reject" in table.stdout and "photocopy" in table.stdout
    status = invoke(env, "status", rejected, "--json")
    view = json.loads(status.stdout)
    assert view["decision"] == "reject"
    assert [r["code"] for r in view["reasons"]] == ["photocopy", "glare"]
    shown = invoke({**env, "COLUMNS": "240"}, "status", rejected)
    assert "decision" in shown.stdout and "photocopy (warning)" in shown.stdout


def test_tenants_policy_shows_sets_and_refuses(cli_db: tuple[dict[str, str], sa.Engine]) -> None:
    env, engine = cli_db
    out = invoke(env, "tenants", "policy", "acme", "--json")
    assert out.exit_code == 0, out.output
    table = {row["code"]: row for row in json.loads(out.stdout)["policy"]}
    assert table["photocopy"]["effect"] == "reject" and table["photocopy"]["set_by"] == "default"
    out = invoke(
        env, "tenants", "policy", "acme", "--consider", "photocopy", "--ignore", "glare,blurry",
        "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    table = {row["code"]: row for row in json.loads(out.stdout)["policy"]}
    assert (table["photocopy"]["effect"], table["photocopy"]["set_by"]) == ("consider", "tenant")
    assert table["blurry"]["effect"] == "ignore"
    with engine.connect() as conn:
        assert load_overrides(conn, "acme")["glare"] is Effect.ignore
        assert load_overrides(conn, "other") == {}
    # Merged, not replaced.
    invoke(env, "tenants", "policy", "acme", "--reject", "glare")
    with engine.connect() as conn:
        assert load_overrides(conn, "acme") == {
            "photocopy": Effect.consider,
            "glare": Effect.reject,
            "blurry": Effect.ignore,
        }
    bad = invoke(env, "tenants", "policy", "acme", "--reject", "nonsense")
    assert bad.exit_code == 2 and "unknown code 'nonsense'" in bad.output
    twice = invoke(env, "tenants", "policy", "acme", "--reject", "glare", "--ignore", "glare")
    assert twice.exit_code == 2 and "two effects" in twice.output
    with engine.connect() as conn:
        assert load_overrides(conn, "acme")["glare"] is Effect.reject  # nothing changed
    reset = invoke(env, "tenants", "policy", "acme", "--reset")
    assert reset.exit_code == 0
    with engine.connect() as conn:
        assert load_overrides(conn, "acme") == {}
    engine.dispose()


def test_env_policy_applies_to_the_default_tenant(
    cli_db: tuple[dict[str, str], sa.Engine],
) -> None:
    env, engine = cli_db
    env = {**env, "MACAO_OCR_WARNING_POLICY": "ignore=glare"}
    out = invoke(env, "tenants", "policy", "default", "--json")
    table = {row["code"]: row for row in json.loads(out.stdout)["policy"]}
    assert (table["glare"]["effect"], table["glare"]["set_by"]) == ("ignore", "env")
    out = invoke(env, "tenants", "policy", "acme", "--json")
    table = {row["code"]: row for row in json.loads(out.stdout)["policy"]}
    assert table["glare"]["effect"] == "consider"
    bad = invoke({**env, "MACAO_OCR_WARNING_POLICY": "reject=x"}, "tenants", "policy", "acme")
    assert bad.exit_code == 2 and "MACAO_OCR_WARNING_POLICY" in bad.output
    engine.dispose()


def test_decide_command_needs_a_selection(cli_db: tuple[dict[str, str], sa.Engine]) -> None:
    env, engine = cli_db
    out = invoke(env, "decide")
    assert out.exit_code == 2 and "--batch or --since" in out.output
    out = invoke(env, "decide", "--since", "2026-01-01T00:00:00")
    assert out.exit_code == 2 and "time zone" in out.output
    engine.dispose()


def test_decide_after_retention_keeps_what_only_the_deleted_data_showed(harness: Harness) -> None:
    """Images gone: `sides_identical` was seen when they were read and stays. Personal fields
    gone: the decision made on the card stands (there is nothing left to decide on)."""
    from worker.store import retention

    same = harness.add_job(back_url="https://cards.example.com/front.jpg", batch="r")
    aged = harness.add_job(batch="r")
    for job_id in (same, aged):
        assert harness.run(job_id) is Outcome.succeeded
    assert "sides_identical" in stored(harness.sessions, same)[1]
    before_aged = stored(harness.sessions, aged)
    with harness.sessions() as session, session.begin():
        conn = session.connection()
        retention.release_images(conn, [same, aged], utcnow())
        retention.clear_results(conn, [aged], utcnow())
    with harness.sessions() as session:
        assert session.get_one(Job, same).front_url is None
        assert session.get_one(Job, same).images_deleted_at is not None

    # Same policy: nothing to change, `sides_identical` kept although the URLs are gone.
    report = redecide(
        harness.sessions,
        harness.deps.settings,
        tenant="default",
        batch="r",
        actor="ops",
        sealer=sealer_for_tests(),
    )
    assert report.changed == []
    assert "sides_identical" in stored(harness.sessions, same)[1]

    # A new policy re-decides the job that still has its fields, never the one that has not.
    with harness.sessions() as session, session.begin():
        save_overrides(
            session.connection(),
            "default",
            {"photocopy": Effect.ignore, "glare": Effect.ignore},
            actor="test",
            now=utcnow(),
        )
    report = redecide(
        harness.sessions,
        harness.deps.settings,
        tenant="default",
        batch="r",
        actor="ops",
        sealer=sealer_for_tests(),
    )
    assert [c.job_id for c in report.changed] == [same]
    assert stored(harness.sessions, same)[1] == ["sides_identical"]
    assert stored(harness.sessions, aged) == before_aged
