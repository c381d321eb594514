"""The one task, thin: `macao_ocr.process_job(job_id)` runs the pipeline in this process.

It never raises for job-level outcomes (they are recorded in SQL), never uses Celery's
retry/ETA (ETA messages sit unacked in worker memory and outlive the visibility timeout;
retries are scheduled in the database and republished by the sweeper), and never lets an
exception's text (which could carry SQL parameters) reach task events or Flower.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import structlog
from celery.exceptions import Reject

from worker.logs import bind_job, clear_job
from worker.publish import QUEUE, TASK_NAME

if TYPE_CHECKING:
    from worker.celery_app import MacaoCelery

log = structlog.get_logger(__name__)


class TaskCrashed(Exception):
    """The pipeline hit a bug; the job's lease brings it back. Carries no detail by design."""


def run_job(app: MacaoCelery, job_id: str, hostname: str | None) -> str:
    """The task body (separate so it reads plainly and is typed)."""
    from worker.errors import ConfigError
    from worker.pipeline import DatabaseUnavailable, process_job
    from worker.runtime import get_runtime

    bind_job(job_id=job_id)
    try:
        runtime = get_runtime(app.settings)
        outcome = process_job(job_id, runtime.deps(worker_host=hostname or socket.gethostname()))
        return outcome.value
    except ConfigError as err:
        # Not the job's fault: leave the message for a worker that can run it.
        log.error("worker_misconfigured", error=str(err))
        raise Reject("worker misconfigured", requeue=True) from None
    except DatabaseUnavailable as err:
        if not err.claimed:
            log.error("job_requeued_db_unavailable")
            raise Reject("database unavailable", requeue=True) from None
        # We hold the job: its lease expires and the sweeper hands it out again.
        log.error("job_abandoned_db_unavailable")
        return "db_unavailable"
    except Exception as err:
        log.error("job_crashed", error_type=type(err).__name__)
        raise TaskCrashed(type(err).__name__) from None
    finally:
        clear_job()


def register_tasks(app: MacaoCelery) -> Any:
    """Register `macao_ocr.process_job` on `app` and return the task."""

    @app.task(  # type: ignore[untyped-decorator,misc]
        name=TASK_NAME,
        # Not shared: a shared task would be registered on every app finalized later in this
        # process, bound to THIS app's settings (tests and the demo build several apps).
        shared=False,
        bind=True,
        queue=QUEUE,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        # Retries are scheduled in the database, never by Celery.
        max_retries=0,
    )
    def process_job_task(self: Any, job_id: str) -> str:
        return run_job(app, str(job_id), getattr(self.request, "hostname", None))

    return process_job_task
