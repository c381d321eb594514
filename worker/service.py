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
from worker.privacy.seal import Sealer
from worker.producer import JobSpec, Source, submit, submit_many
from worker.settings import Settings, load_settings
from worker.store import access
from worker.store.views import job_view

FINISHED = frozenset({JobStatus.succeeded.value, JobStatus.failed.value})


def get_job(
    session_factory: sessionmaker[Session],
    settings: Settings,
    job_id: uuid.UUID | str,
    *,
    sealer: Sealer,
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
        if job is None:
            return None
        view = job_view(session, job, sealer=sealer, history=history)
        shown = access.with_personal_fields(session, [job.id])
    # Logged before it is handed over, like every read that shows personal fields.
    access.record(
        session_factory,
        actor=access.process_actor(),
        how=access.PYTHON_GET_JOB,
        reads=[access.Read(tenant=job.tenant, job_id=i) for i in shown],
    )
    return view


class Producer:
    """A database engine and a broker connection for one backend process, built from
    settings, with the producer's calls bound to them (a context manager: `close()` releases
    both). `publisher` replaces the Celery publisher (tests, a broker of your own)."""

    def __init__(self, settings: Settings, *, publisher: Publisher | None = None) -> None:
        from worker.store.engine import make_engine, make_sessionmaker

        self.settings = settings
        # Keys first: without them nothing is opened (ConfigError naming the variables).
        self.sealer = Sealer.from_settings(settings)
        engine: Engine = make_engine(settings)
        self.session_factory: sessionmaker[Session] = make_sessionmaker(engine)
        self._closers: list[Any] = []
        if publisher is None:
            from worker.app import create_app
            from worker.broker.publish import CeleryPublisher

            app = create_app(settings)
            publisher = CeleryPublisher(app)
            self._closers.append(app.close)
        self._closers.append(engine.dispose)
        self.publisher = publisher

    @classmethod
    def from_settings(cls, settings: Settings) -> Producer:
        """The engine and the Celery publisher built from `settings`."""
        return cls(settings)

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
            sealer=self.sealer,
        )

    def submit_many(self, items: Iterable[JobSpec], *, batch: str | None = None) -> list[uuid.UUID]:
        """All-or-nothing validation of every item, then store and queue them in chunks."""
        return submit_many(
            self.session_factory,
            self.publisher,
            self.settings,
            items,
            batch=batch,
            sealer=self.sealer,
        )

    def get_job(self, job_id: uuid.UUID | str, *, history: bool = False) -> dict[str, Any] | None:
        """The job's `status --json` object, or None if unknown."""
        return get_job(
            self.session_factory, self.settings, job_id, sealer=self.sealer, history=history
        )

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
        while self._closers:
            self._closers.pop(0)()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
