"""The Python front door for an onboarding backend: submit cards, follow and read their jobs.

    from worker import Producer
    with Producer.from_env() as producer:
        job_id = producer.submit("front.jpg", back="https://.../back.jpg", portrait=True)
        job = producer.wait(job_id, timeout_s=60)   # the `status --json` object

Everything here is a thin composition of the producer (validation, commit, then publish),
the store's views and the settings; a backend that prefers plain functions uses
`worker.submit`, `worker.submit_many` and `worker.get_job` with its own session factory.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any, Self

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobStatus
from worker.broker.publish import Publisher
from worker.producer import JobSpec, Source, submit, submit_many
from worker.settings import Settings, load_settings
from worker.store.views import job_view

FINISHED = frozenset({JobStatus.succeeded.value, JobStatus.failed.value})


def get_job(
    session_factory: sessionmaker[Session],
    settings: Settings,
    job_id: uuid.UUID | str,
    *,
    history: bool = False,
) -> dict[str, Any] | None:
    """The job's `status --json` object, or None if it is unknown (or another tenant's)."""
    try:
        key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        return None
    with session_factory() as session:
        job = session.scalars(
            select(Job).where(Job.id == key, Job.tenant == settings.tenant)
        ).one_or_none()
        return None if job is None else job_view(session, job, history=history)


class Producer:
    """A database engine and a broker connection for one backend process (a context manager:
    `close()` releases both)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        publisher: Publisher,
        *,
        closers: Iterable[Any] = (),
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.publisher = publisher
        self._closers = list(closers)

    @classmethod
    def from_settings(cls, settings: Settings) -> Producer:
        """Build the engine and the Celery publisher from `settings`."""
        from worker.app import create_app
        from worker.broker.publish import CeleryPublisher
        from worker.store.engine import make_engine, make_sessionmaker

        engine: Engine = make_engine(settings)
        app = create_app(settings)
        return cls(
            settings,
            make_sessionmaker(engine),
            CeleryPublisher(app),
            closers=(app.close, engine.dispose),
        )

    @classmethod
    def from_env(cls) -> Producer:
        """`from_settings` with the settings read from the environment (MACAO_OCR_*)."""
        return cls.from_settings(load_settings())

    def submit(
        self,
        front: Source | None,
        back: Source | None = None,
        *,
        portrait: bool = False,
        tag: str | None = None,
        batch: str | None = None,
    ) -> uuid.UUID:
        """Validate, store and queue one card; InputError names the rule a refused one broke."""
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
        """All-or-nothing validation of every item, then store and queue them in chunks."""
        return submit_many(self.session_factory, self.publisher, self.settings, items, batch=batch)

    def get_job(self, job_id: uuid.UUID | str, *, history: bool = False) -> dict[str, Any] | None:
        """The job's `status --json` object, or None if unknown."""
        return get_job(self.session_factory, self.settings, job_id, history=history)

    def wait(
        self, job_id: uuid.UUID | str, *, timeout_s: float = 300.0, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """Poll until the job is succeeded or failed; TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.get_job(job_id)
            if view is None:
                raise LookupError(f"no job {job_id} for tenant {self.settings.tenant!r}")
            if view["status"] in FINISHED:
                return view
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def close(self) -> None:
        """Close the broker connection and the database pool."""
        for close in self._closers:
            close()
        self._closers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
