"""The Python client of the README: `Producer` built from settings submits, reads and waits
for jobs of its own tenant only."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

import migrations
from emulator.specimen import make_specimen
from models import Job, JobStatus
from worker import Producer
from worker.broker.publish import RecordingPublisher
from worker.settings import Settings


def test_producer_submits_reads_and_waits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'client.db'}"
    migrations.upgrade(url)
    publisher = RecordingPublisher()
    with Producer(Settings(database_url=url, tenant="acme"), publisher=publisher) as producer:
        job_id = producer.submit(make_specimen(seed=5).image, tag="c-1")
        assert publisher.published == [job_id]
        view = producer.get_job(job_id)
        assert view is not None and (view["status"], view["tag"]) == ("queued", "c-1")
        with pytest.raises(TimeoutError):
            producer.wait(job_id, timeout_s=0.2, poll_s=0.05)
        with producer.session_factory() as session, session.begin():
            session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.succeeded))
        assert producer.wait(job_id, timeout_s=5)["status"] == "succeeded"
    with Producer(Settings(database_url=url, tenant="other"), publisher=publisher) as other:
        assert other.get_job(job_id) is None
