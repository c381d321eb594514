"""`purge`, `erase` and `audit` without a server: argument rules, the ID-number lookup's
absence said in one line, and retention on the embedded SQLite database (the demo's)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import sessionmaker
from typer.testing import CliRunner

import migrations
from emulator.specimen import make_specimen
from models import Image, Job, JobStatus
from tests.fixtures.workers import sealer_for_tests
from worker.broker.publish import RecordingPublisher
from worker.cli import app
from worker.producer import JobSpec, submit_many
from worker.settings import Settings, load_settings
from worker.store.retention import purge


def test_retention_defaults_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.image_retention_s == 0
    assert defaults.failed_image_retention_s == 7 * 86_400
    assert defaults.result_retention_s == 90 * 86_400
    monkeypatch.setenv("MACAO_OCR_IMAGE_RETENTION_S", "60")
    monkeypatch.setenv("MACAO_OCR_FAILED_IMAGE_RETENTION_S", "3600")
    monkeypatch.setenv("MACAO_OCR_RESULT_RETENTION_S", "86400")
    loaded = load_settings()
    assert (
        loaded.image_retention_s,
        loaded.failed_image_retention_s,
        loaded.result_retention_s,
    ) == (60, 3600, 86400)


@pytest.mark.parametrize(
    "args",
    [["erase"], ["erase", "--job", "00000000-0000-0000-0000-000000000001", "--tag", "t"]],
)
def test_erase_needs_exactly_one_selection(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, args, env={"MACAO_OCR_DATABASE_URL": f"sqlite:///{tmp_path}/x"}
    )
    assert result.exit_code == 2
    assert "exactly one of --job, --tag or --id-number" in result.output


def test_erase_by_id_number_without_a_lookup_key_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MACAO_OCR_LOOKUP_KEY")
    db = tmp_path / "never-created.db"
    result = CliRunner().invoke(
        app,
        ["erase", "--id-number", "1234567(8)"],
        env={"MACAO_OCR_DATABASE_URL": f"sqlite:///{db}"},
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "lookup by ID number is off" in lines[0]
    assert "1234567" not in result.output  # the number is never echoed
    assert not db.exists()  # refused before any database work


def test_purge_on_sqlite_deletes_a_succeeded_jobs_image(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    migrations.upgrade(url)
    engine = create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    settings = Settings(database_url=url)
    done, waiting = submit_many(
        factory,
        RecordingPublisher(),
        settings,
        [JobSpec(front=make_specimen(seed=s).image) for s in (1, 2)],
        sealer=sealer_for_tests(),
    )
    at = datetime.now(UTC)
    with factory() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == done).values(status=JobStatus.succeeded, finished_at=at)
        )
    dry = purge(factory, settings, now=at + timedelta(seconds=1), dry_run=True)
    assert (dry.removed.jobs_images, dry.removed.images) == (1, 1)
    done_report = purge(factory, settings, now=at + timedelta(seconds=1))
    assert done_report.removed.to_dict() == dry.removed.to_dict()
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 1
        job = session.get(Job, done)
        assert job is not None and job.images_deleted_at is not None
        assert job.front_image_id is None
        assert session.get(Job, waiting).front_image_id is not None  # type: ignore[union-attr]
    engine.dispose()


def test_erase_two_jobs_after_one_job_flag_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    migrations.upgrade(url)
    engine = create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    first, second, other = submit_many(
        factory,
        RecordingPublisher(),
        Settings(database_url=url),
        [JobSpec(front=make_specimen(seed=s).image, tag="t") for s in (3, 4, 5)],
        sealer=sealer_for_tests(),
    )
    env = {"MACAO_OCR_DATABASE_URL": url}
    lone = CliRunner().invoke(app, ["erase", str(first)], env=env)
    assert lone.exit_code == 2 and "after --job" in lone.output
    result = CliRunner().invoke(
        app, ["erase", "--job", str(first), str(second), "--reason", "asked", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(report["erased"]) == sorted([str(first), str(second)])
    assert report["removed"]["images"] == 2
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 1
        for job_id in (first, second):
            job = session.get(Job, job_id)
            assert job is not None and job.erased_at is not None
            assert (job.status, job.last_error_code) == (JobStatus.failed, "Internal.Erased")
        kept = session.get(Job, other)
        assert kept is not None and kept.erased_at is None and kept.front_image_id is not None
    engine.dispose()
