"""Retention and erasure end to end: a real worker (with its sweeper) against the emulator,
the CLI in subprocesses, the HTTP API in process. Calls are counted at the emulator: an erased
job and a job whose images are gone cost none."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from emulator.specimen import make_specimen
from models import Image, Job, JobEvent, JobStatus
from tests.fixtures.workers import submit_jobs
from tests.integration.test_replay_e2e import run_cli, wait_until
from worker.broker.publish import RecordingPublisher
from worker.http.app import create_app
from worker.producer import JobSpec
from worker.settings import Settings
from worker.tenants import create_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def deployment(
    worker_env: dict[str, str],
) -> Iterator[tuple[dict[str, str], sessionmaker[Session]]]:
    engine = sa.create_engine(worker_env["MACAO_OCR_DATABASE_URL"])
    yield dict(worker_env), sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def test_erased_and_imageless_jobs_are_never_called_for(
    deployment: tuple[dict[str, str], sessionmaker[Session]],
    emulator: Any,
    celery_workers: Any,
) -> None:
    env, factory = deployment
    # Stored with no worker running: the erased one is still queued when erased.
    specs = [JobSpec(front=make_specimen(seed=500 + i).image) for i in range(3)]
    read, kept, erased = submit_jobs(env, factory, specs)
    gone = run_cli(env, "erase", "--job", str(erased), "--reason", "customer asked", "--json")
    assert gone.returncode == 0, gone.stderr
    report = json.loads(gone.stdout)
    assert report["erased"] == [str(erased)] and report["stopped"] == [str(erased)]
    assert report["removed"]["images"] == 1

    celery_workers(env, n=1, concurrency=4)
    wait_until(
        factory,
        [read, kept],
        lambda jobs: all(j.status == JobStatus.succeeded for j in jobs),
        90,
        "both jobs to succeed",
    )
    # The default retention (0) deletes a succeeded job's images at the worker's next sweep.
    wait_until(
        factory,
        [read, kept],
        lambda jobs: all(j.images_deleted_at is not None for j in jobs),
        30,
        "the sweeper to delete the images",
    )
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 0
        job = session.get(Job, erased)
        assert job is not None
        assert (job.status, job.last_error_code, job.api_calls) == (
            JobStatus.failed,
            "Internal.Erased",
            0,
        )
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == erased)).one()
        assert (event.kind, event.reason) == ("erased", "customer asked") and event.actor
    assert emulator.counters()["total"] == 2  # the erased job cost nothing

    # Replay, even forced, is refused with its code: nothing to send, nothing bought.
    again = run_cli(env, "replay", "--force", "--json", str(read), str(erased))
    assert again.returncode == 1
    refused = {r["job_id"]: r["code"] for r in json.loads(again.stdout)["refused"]}
    assert refused == {str(read): "Replay.ImagesDeleted", str(erased): "Replay.Erased"}

    publisher = RecordingPublisher()
    settings = Settings(database_url=env["MACAO_OCR_DATABASE_URL"], qps=0)
    app = create_app(settings, publisher=publisher)
    with TestClient(app) as client:
        key = create_key(app.state.services.session_factory, "default")
        answer = client.post(
            f"/v1/jobs/{kept}/replay",
            headers={"Authorization": f"Bearer {key.api_key}"},
            json={"force": True, "reason": "again"},
        )
    assert answer.status_code == 409
    assert answer.json()["code"] == "Replay.ImagesDeleted"
    assert publisher.published == []
    with factory() as session:
        assert session.scalar(select(Job.status).where(Job.id == kept)) == JobStatus.succeeded
    assert emulator.counters()["total"] == 2
