"""The plain Celery way, the benchmark's point of comparison (issue 4).

What a first version would look like: one task per job, default prefork pool (concurrency =
cores), a BLOCKING HTTP client (requests) so each call holds a whole process, Celery's own
`rate_limit=f"{Q}/s"` (a token bucket per worker instance, not shared), a throttled answer
retried with Celery's retry/countdown, and the result row written directly. It reads the same
job rows and stored images as our pipeline and sends the same signed body (worker.tencent.signing,
worker.tencent.validation), so the emulator sees identical calls.

    celery -A bench.baseline_app worker -Q macao-ocr-baseline      # env: MACAO_OCR_*

The app is built from the environment on first access of `bench.baseline_app.app` (never at
import), like `worker.app`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import requests
from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobStatus
from models.base import utcnow
from worker.privacy.seal import Sealer
from worker.settings import Settings, load_settings
from worker.store import job_sql
from worker.store.engine import make_engine, make_sessionmaker
from worker.store.images import load_request
from worker.tencent.client import ClientConfig, signed_headers
from worker.tencent.response import parse_response
from worker.tencent.validation import build_payload, encode_body

TASK_NAME = "macao_ocr_bench.baseline_job"
QUEUE = "macao-ocr-baseline"
# The usual plain-Celery answer to a throttle: try again a second later (an ETA message).
THROTTLE_RETRY_S = 1.0
TRANSPORT_MAX_RETRIES = 5


@dataclass
class _ProcessState:
    """Per pool process (built after the fork): HTTP session, DB sessions, client config."""

    pid: int
    http: requests.Session
    sessions: sessionmaker[Session]
    config: ClientConfig
    sealer: Sealer


_state: _ProcessState | None = None
_state_lock = threading.Lock()


def _process_state(settings: Settings) -> _ProcessState:
    global _state
    with _state_lock:
        if _state is None or _state.pid != os.getpid():
            engine = make_engine(settings, pool_size=2, max_overflow=2, hide_parameters=True)
            _state = _ProcessState(
                pid=os.getpid(),
                http=requests.Session(),
                sessions=make_sessionmaker(engine),
                config=ClientConfig.from_settings(settings),
                sealer=Sealer.from_settings(settings),
            )
        return _state


def call_api(state: _ProcessState, body: bytes) -> dict[str, Any]:
    """One signed, blocking POST; returns Tencent's `Response` object."""
    cfg = state.config
    # The same signed headers as our client (the baseline differs in how it runs, not in
    # what it sends).
    headers = signed_headers(cfg, body, int(time.time()))
    resp = state.http.post(cfg.url, data=body, headers=headers, timeout=(3.0, 30.0))
    resp.raise_for_status()
    response: dict[str, Any] = resp.json()["Response"]
    return response


def _count_call(session: Session, job_id: uuid.UUID) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(api_calls=Job.api_calls + 1)
        .execution_options(synchronize_session=False)
    )


def run_job(task: Any, settings: Settings, job_id_text: str) -> str:
    """The task body: load, call (blocking), store; throttles go back through Celery retry."""
    state = _process_state(settings)
    job_id = uuid.UUID(job_id_text)
    with state.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.status in (JobStatus.succeeded, JobStatus.failed):
            return "skipped"
        body = encode_body(build_payload(load_request(session, state.sealer, job)))
    try:
        response = call_api(state, body)
    except requests.RequestException as exc:
        with state.sessions() as session, session.begin():
            _count_call(session, job_id)
        raise task.retry(
            countdown=THROTTLE_RETRY_S, max_retries=TRANSPORT_MAX_RETRIES, exc=exc
        ) from None
    error = response.get("Error")
    with state.sessions() as session, session.begin():
        _count_call(session, job_id)
        if error is None:
            # The result row, its warnings; a second result raises IntegrityError.
            job_sql.insert_result(
                session.connection(),
                job_id,
                parse_response(response),
                False,
                sealer=state.sealer,
            )
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=JobStatus.succeeded, finished_at=utcnow(), attempts=1)
                .execution_options(synchronize_session=False)
            )
            return "succeeded"
    code = str(error.get("Code", "")) if isinstance(error, dict) else ""
    if code.startswith("RequestLimitExceeded"):
        raise task.retry(countdown=THROTTLE_RETRY_S, max_retries=None)
    with state.sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.failed, finished_at=utcnow(), last_error_code=code)
            .execution_options(synchronize_session=False)
        )
    return "failed"


def create_app(settings: Settings) -> Celery:
    """The baseline app: Celery defaults except JSON, no results, and the per-worker rate."""
    app = Celery("macao_ocr_baseline", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
    )
    # Celery's rate limit: a token bucket inside each worker instance (not shared).
    rate_limit = f"{settings.qps:g}/s" if settings.qps > 0 else None

    @app.task(name=TASK_NAME, bind=True, rate_limit=rate_limit, ignore_result=True)  # type: ignore[untyped-decorator]
    def baseline_job(self: Any, job_id: str) -> str:
        return run_job(self, settings, job_id)

    return app


class BaselinePublisher:
    """`worker.broker.publish.Publisher` for the baseline queue (the producer is shared)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, job_ids: Any) -> None:
        with self.app.producer_or_acquire() as producer:
            for job_id in job_ids:
                self.app.send_task(TASK_NAME, args=[str(job_id)], queue=QUEUE, producer=producer)


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """`celery -A bench.baseline_app` reads `app`: built from the environment on first use."""
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = create_app(load_settings())
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
