"""The migrations build exactly the models' schema, both ways, on a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

import migrations
import models
from models import Job, JobStatus, Result
from tests.fixtures.workers import TEST_DEFAULTS, sealed_job, sealer_for_tests
from worker.errors import ConfigError

# Every table the models declare: the migrations must build exactly these.
TABLES = set(models.Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff(url: str) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, models.Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(fresh_migrated_database: Callable[[], str]) -> None:
    url = fresh_migrated_database()
    assert _tables(url) == TABLES
    migrations.downgrade(url, "base")
    assert _tables(url) == set()
    migrations.upgrade(url)
    assert _tables(url) == TABLES
    assert _diff(url) == []


def test_migrated_schema_matches_models(migrated_pg_url: str) -> None:
    assert _diff(migrated_pg_url) == []


def test_diff_would_notice_a_missing_column(migrated_pg_url: str) -> None:
    # Guards the test above against comparing nothing.
    engine = sa.create_engine(migrated_pg_url)
    try:
        with engine.connect() as conn:
            trans = conn.begin()
            conn.execute(sa.text("ALTER TABLE job DROP COLUMN tag"))
            context = MigrationContext.configure(conn)
            diff = compare_metadata(context, models.Base.metadata)
            trans.rollback()
    finally:
        engine.dispose()
    assert any(d[0] == "add_column" and d[3].name == "tag" for d in diff)  # type: ignore[index]


def _job() -> Job:
    return sealed_job(id=uuid.uuid4(), front_url="https://example.invalid/a.jpg")


def test_one_result_per_job_is_enforced(db_session: Session) -> None:
    job = _job()
    db_session.add(job)
    db_session.flush()
    db_session.add(Result(job_id=job.id, request_id="r1"))
    db_session.flush()
    db_session.expunge_all()
    with pytest.raises(sa.exc.IntegrityError), db_session.begin_nested():
        db_session.add(Result(job_id=job.id, request_id="r2"))
        db_session.flush()


def test_status_check_constraint(db_session: Session) -> None:
    job = _job()
    db_session.add(job)
    db_session.flush()
    assert job.status == JobStatus.queued
    with pytest.raises(sa.exc.IntegrityError), db_session.begin_nested():
        db_session.execute(sa.text("UPDATE job SET status = 'lost' WHERE id = :id"), {"id": job.id})


def test_job_needs_an_image(db_session: Session) -> None:
    with pytest.raises(sa.exc.IntegrityError), db_session.begin_nested():
        db_session.add(Job(id=uuid.uuid4()))
        db_session.flush()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(url)
    assert _tables(url) == TABLES
    assert _diff(url) == []
    migrations.downgrade(url, "base")
    assert _tables(url) == set()


def test_cli_db_commands(fresh_migrated_database: Callable[[], str]) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    url = fresh_migrated_database()
    env = {"MACAO_OCR_DATABASE_URL": url}
    runner = CliRunner()
    current = runner.invoke(app, ["db", "current"], env=env)
    head = ScriptDirectory.from_config(migrations.config()).get_current_head()
    assert current.exit_code == 0 and f"{head} (head)" in current.stdout
    assert runner.invoke(app, ["db", "downgrade", "base"], env=env).exit_code == 0
    assert _tables(url) == set()
    assert runner.invoke(app, ["db", "current"], env=env).stdout.strip() == ""
    assert runner.invoke(app, ["db", "upgrade"], env=env).exit_code == 0
    assert _tables(url) == TABLES
    bad = runner.invoke(app, ["db", "current"], env={"MACAO_OCR_DATABASE_URL": "mysql://x/y"})
    assert bad.exit_code == 2 and "MACAO_OCR_DATABASE_URL" in bad.stderr


def test_alembic_command_line_from_repo_root(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "MACAO_OCR_DATABASE_URL": url}
    alembic = Path(sys.executable).parent / "alembic"
    done = subprocess.run(
        [str(alembic), "upgrade", "head"], cwd=root, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    assert _tables(url) == TABLES


def _job_with_result(
    conn: sa.Connection, id_number: str, warning_code: int, request_id: str
) -> uuid.UUID:
    job_id = uuid.uuid4()
    conn.execute(
        sa.text(
            "INSERT INTO job (id, tenant, status, front_url, portrait, attempts, api_calls,"
            " created_at) VALUES (:id, 'default', 'succeeded', 'https://x.test/a.jpg', false,"
            " 1, 1, now())"
        ),
        {"id": job_id},
    )
    conn.execute(
        sa.text(
            "INSERT INTO result (job_id, request_id, id_number, warning_service_disabled,"
            " created_at) VALUES (:id, :rid, :num, false, now())"
        ),
        {"id": job_id, "rid": request_id, "num": id_number},
    )
    conn.execute(
        sa.text("INSERT INTO warning (job_id, code, name) VALUES (:id, :code, :name)"),
        {"id": job_id, "code": warning_code, "name": f"unknown_{warning_code}"},
    )
    return job_id


def test_0003_stores_what_the_api_can_return_and_downgrades(
    fresh_migrated_database: Callable[[], str],
) -> None:
    """Before 0003 a 40-character ID number, a 120-character request id or a warning code
    beyond SMALLINT failed the store of an answer already paid for; now they are kept.
    Downgrade works, and refuses (changing nothing) while a value is over the old limit."""
    url = fresh_migrated_database()
    migrations.downgrade(url, "0007")  # plaintext columns, as 0003 made them
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            long_job = _job_with_result(conn, "1" * 40, -9_999_999, "r" * 120)
        with engine.begin() as conn:
            stored = conn.execute(
                sa.text("SELECT id_number FROM result WHERE job_id = :id"), {"id": long_job}
            ).scalar()
        assert stored == "1" * 40
        with pytest.raises(sa.exc.DBAPIError):
            migrations.downgrade(url, "0002")
        assert "kept_answer" in _tables(url)  # nothing of the downgrade held
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM job"))
            _job_with_result(conn, "1234567(8)", -9101, str(uuid.uuid4()))
    finally:
        engine.dispose()
    migrations.downgrade(url, "0002")
    assert "kept_answer" not in _tables(url)
    migrations.upgrade(url)
    assert _diff(url) == []


def test_0008_encrypts_the_rows_already_stored(
    fresh_migrated_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plaintext rows from before 0008 are sealed in place under the configured ring (and
    their lookup hash written); without keys the upgrade refuses and changes nothing."""
    url = fresh_migrated_database()
    migrations.downgrade(url, "0007")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            job_id = _job_with_result(conn, "1234567(8)", -9101, "r-1")
            conn.execute(sa.text("UPDATE result SET birthday = '1990-02-03', height_m = 1.64"))
        monkeypatch.delenv("MACAO_OCR_DATA_KEYS")
        with pytest.raises(ConfigError, match="MACAO_OCR_DATA_KEYS"):
            migrations.upgrade(url)
        monkeypatch.setenv("MACAO_OCR_DATA_KEYS", TEST_DEFAULTS["MACAO_OCR_DATA_KEYS"])
        migrations.upgrade(url)
        assert _diff(url) == []
        sealer = sealer_for_tests()
        with Session(engine) as session:
            job = session.get_one(Job, job_id)
            assert sealer.open_url(job.id, "front_url", job.front_url) == "https://x.test/a.jpg"
            row = session.get_one(Result, job_id)
            opened = sealer.open_result(row)
            assert (opened.id_number, opened.birthday) == ("1234567(8)", date(1990, 2, 3))
            assert opened.height_m == Decimal("1.64")
            assert row.id_number_hash == sealer.lookup_hash("1234567(8)")
            assert row.id_number is not None and b"1234567" not in row.id_number
    finally:
        engine.dispose()
