"""The Python client: submit cards, wait for them, read their results, in a few lines.

    from worker import Producer

    with Producer.from_env() as producer:
        job_id = producer.submit("front.jpg", portrait=True, tag="customer-42")
        job = producer.wait(job_id, timeout_s=120)

Jobs are the caller's tenant's (`MACAO_OCR_TENANT`); a job is the `status --json` object.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from sqlalchemy import select

from models import TERMINAL_STATUSES, Job
from worker.broker.publish import Publisher
from worker.producer import JobSpec, Source, submit, submit_many
from worker.settings import Settings, load_settings
from worker.store.views import job_view


class Producer:
    """A database engine and a broker connection, built from settings, with the producer's
    calls bound to them. Close it (or use `with`) to release both."""

    def __init__(self, settings: Settings, *, publisher: Publisher | None = None) -> None:
        from worker.store.engine import make_engine, make_sessionmaker

        self.settings = settings
        self._engine = make_engine(settings)
        self.session_factory = make_sessionmaker(self._engine)
        self._celery: Any = None
        if publisher is None:
            from worker.app import create_app
            from worker.broker.publish import CeleryPublisher

            self._celery = create_app(settings)
            publisher = CeleryPublisher(self._celery)
        self.publisher = publisher

    @classmethod
    def from_env(cls, **overrides: Any) -> Producer:
        """Settings from the MACAO_OCR_* environment (as the CLI reads them), plus overrides."""
        return cls(load_settings(**overrides))

    def submit(
        self,
        front: Source | None,
        back: Source | None = None,
        *,
        portrait: bool = False,
        tag: str | None = None,
        batch: str | None = None,
    ) -> uuid.UUID:
        """Validate and queue one card (a file path, an http(s) URL or the image bytes)."""
        return submit(
            self.session_factory,
            self.publisher,
            self.settings,
            front,
            back,
            portrait=portrait,
            tag=tag,
            batch=batch,
        )

    def submit_many(self, items: Iterable[JobSpec], *, batch: str | None = None) -> list[uuid.UUID]:
        """Validate every item first (one bad item: nothing queued), then queue them all."""
        return submit_many(self.session_factory, self.publisher, self.settings, items, batch=batch)

    def get_job(self, job_id: uuid.UUID | str, *, history: bool = False) -> dict[str, Any] | None:
        """The job's status object, or None if this tenant has no such job."""
        with self.session_factory() as session:
            job = session.scalars(
                select(Job).where(
                    Job.id == uuid.UUID(str(job_id)), Job.tenant == self.settings.tenant
                )
            ).first()
            return None if job is None else job_view(session, job, history=history)

    def wait(
        self, job_id: uuid.UUID | str, *, timeout_s: float = 300.0, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """Poll until the job succeeded or failed; TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.get_job(job_id)
            if view is None:
                raise LookupError(f"no job {job_id} for tenant {self.settings.tenant}")
            if view["status"] in TERMINAL_STATUSES:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {view['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()
        self._engine.dispose()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()
