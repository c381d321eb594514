"""The Celery app and its one task: Redis broker, no result backend, late acks.

`create_app(settings)` is the only constructor; `get_app()` builds one from the environment
on first use (what `celery -A worker worker` reaches through `worker.app`). Building an app
starts nothing: producers build one just to publish.
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery, signals
from celery.exceptions import Reject

from worker.broker.publish import (
    QUEUE,
    TASK_NAME,
    WEBHOOK_QUEUE,
    WEBHOOK_TASK_NAME,
    CeleryPublisher,
)
from worker.logs import bind_job, clear_job
from worker.settings import Settings, load_settings

if TYPE_CHECKING:
    from worker.sweeper import SweeperThread

log = structlog.get_logger(__name__)


class MacaoCelery(Celery):
    """A Celery app that carries the Settings it was built from (tasks and signals read them)."""

    settings: Settings


def longest_hold_s(settings: Settings) -> float:
    """The longest one task holds its message: quota wait, the call (plus our guard), a
    database outage ridden out in process, and a lease's worth of slack."""
    from worker.pipeline import CALL_GUARD_S

    return (
        settings.max_quota_wait_s
        + settings.total_timeout_s
        + CALL_GUARD_S
        + settings.db_write_retry_s
        + settings.lease_s
    )


def _transport_for(settings: Settings) -> str | None:
    from worker.broker.transport import TRANSPORT

    # rediss:// keeps kombu's own URL handling (TLS options); sentinel:// its own transport.
    tuned = settings.broker_tweaks and settings.broker_url.startswith("redis://")
    return TRANSPORT if tuned else None


def broker_ssl(broker_url: str) -> dict[str, Any] | None:
    """TLS options for a rediss:// broker: the server's certificate is verified.

    kombu, given rediss:// and no options, connects WITHOUT verifying the certificate (it
    only logs a warning). `ssl_*` query parameters in the URL (`ssl_ca_certs=/path/ca.pem`,
    `ssl_cert_reqs=...`, `ssl_certfile`, `ssl_keyfile`) replace these defaults, the same
    parameters redis-py reads for our own Redis clients on the same URL."""
    if not broker_url.startswith("rediss://"):
        return None
    import ssl

    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def create_app(settings: Settings) -> MacaoCelery:
    """A configured app with the `macao_ocr.process_job` task registered."""
    app = MacaoCelery("macao_ocr", broker=settings.broker_url, set_as_current=False)
    app.settings = settings
    app.conf.update(
        broker_url=settings.broker_url,
        # kombu's Redis transport, one client object per pool (see worker.broker.transport).
        broker_transport=_transport_for(settings),
        broker_use_ssl=broker_ssl(settings.broker_url),
        # Results live in SQL. A backend would be one more place personal data could reach.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_default_queue=QUEUE,
        task_routes={TASK_NAME: {"queue": QUEUE}, WEBHOOK_TASK_NAME: {"queue": WEBHOOK_QUEUE}},
        # Ack after the task body: a worker killed mid-job leaves its message to redeliver.
        task_acks_late=True,
        # ...and a lost worker process must not ack on its way out either.
        task_reject_on_worker_lost=True,
        # Reserve only what the threads can start now; the rest stays in Redis for others.
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacked message after this long. It must exceed the longest a
        # task legitimately holds one (quota wait + call + in-process DB retry), or a slow but
        # healthy job would be handed to a second worker. Duplicates stay harmless (the claim
        # is atomic) but would cost a second call.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Flower and `celery events` see every task; messages carry only the job id.
        worker_send_task_events=True,
        # ...in batches (worker.broker.consumer; a name, so producers never import it).
        worker_consumer=(
            "worker.broker.consumer:Consumer"
            if settings.broker_tweaks
            else "celery.worker.consumer.consumer:Consumer"
        ),
        task_send_sent_event=True,
        # Workers outlive a Redis restart: keep reconnecting, at start and forever after.
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        # A running task cannot be cancelled in the threads pool; its job is safe anyway
        # (lease + sweeper), so keep it running across a broker reconnect.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # The shared limiter does rate limiting across the fleet; Celery's is per worker.
        worker_disable_rate_limits=True,
        enable_utc=True,
        timezone="UTC",
    )
    hold_s = longest_hold_s(settings)
    if settings.visibility_timeout_s < hold_s:
        log.warning(
            "visibility_timeout_short",
            visibility_timeout_s=settings.visibility_timeout_s,
            longest_hold_s=hold_s,
        )
    from worker.logs import install_celery_logging

    install_celery_logging(settings)
    register_tasks(app)
    _connect_worker_signals(app)
    return app


# -- the one task, thin: `macao_ocr.process_job(job_id)` runs the pipeline in this process.
#
# It never raises for job-level outcomes (they are recorded in SQL), never uses Celery's
# retry/ETA (ETA messages sit unacked in worker memory and outlive the visibility timeout;
# retries are scheduled in the database and republished by the sweeper), and never lets an
# exception's text (which could carry SQL parameters) reach task events or Flower.


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

    @app.task(  # type: ignore[untyped-decorator,misc]
        name=WEBHOOK_TASK_NAME,
        shared=False,
        queue=WEBHOOK_QUEUE,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        # Retries are scheduled in the outbox row, never by Celery.
        max_retries=0,
    )
    def deliver_webhook_task(delivery_id: str) -> str:
        return run_delivery(app, str(delivery_id))

    return process_job_task


def run_delivery(app: MacaoCelery, delivery_id: str) -> str:
    """The webhook task's body: one attempt at one delivery (worker.webhooks.delivery)."""
    from worker.runtime import get_runtime
    from worker.webhooks.delivery import DeliveryDeps, deliver

    try:
        runtime = get_runtime(app.settings)
        deps = DeliveryDeps(
            settings=app.settings, transaction=runtime.engine.begin, send=_webhook_sender(app)
        )
        return deliver(delivery_id, deps)
    except Exception as err:
        # The delivery's lease brings it back through the sweeper. No text: it could hold
        # a URL with a token in it.
        log.error("webhook_crashed", error_type=type(err).__name__)
        raise TaskCrashed(type(err).__name__) from None


_senders: dict[int, Any] = {}
_senders_lock = threading.Lock()


def _webhook_sender(app: MacaoCelery) -> Any:
    """One HTTP sender per app (one aiohttp session on the runtime's loop)."""
    from worker.runtime import get_runtime
    from worker.webhooks.sender import HttpSender

    with _senders_lock:
        sender = _senders.get(id(app))
        if sender is None:
            runtime = get_runtime(app.settings)
            sender = _senders[id(app)] = HttpSender(app.settings, runtime.loop.run)
        return sender


_app: MacaoCelery | None = None
_app_lock = threading.Lock()


def get_app() -> MacaoCelery:
    """The process's app, built from the environment on first use."""
    global _app
    with _app_lock:
        if _app is None:
            _app = create_app(load_settings())
        return _app


def _close_webhook_sender(app: MacaoCelery) -> None:
    """Close the webhook sender's HTTP session on its loop, before the loop stops."""
    from worker.runtime import get_runtime

    with _senders_lock:
        sender = _senders.pop(id(app), None)
    if sender is None:
        return
    try:
        get_runtime(app.settings).loop.run(sender.close(), timeout_s=5.0)
    except Exception as err:
        log.warning("webhook_sender_close_failed", error_type=type(err).__name__)


# -- worker lifecycle: fail fast on bad config, warm the runtime, run the sweeper


def _sender_app(sender: Any) -> Any:
    return getattr(sender, "app", None)


def _connect_worker_signals(app: MacaoCelery) -> None:
    uid = f"macao_ocr.{id(app)}"
    sweeper: list[SweeperThread] = []

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if _sender_app(sender) is not app:
            return
        from worker.errors import ConfigError
        from worker.tencent.client import ClientConfig

        try:
            ClientConfig.from_settings(app.settings)
        except ConfigError as err:
            # Better no worker than one that takes jobs it can never call for.
            print(f"macao-ocr worker: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        if _sender_app(sender) is not app:
            return
        from worker.runtime import get_runtime
        from worker.sweeper import start_sweeper_thread

        runtime = get_runtime(app.settings)
        webhooks = CeleryPublisher(app, task=WEBHOOK_TASK_NAME, queue=WEBHOOK_QUEUE)
        thread = start_sweeper_thread(
            app.settings, runtime.session_factory, CeleryPublisher(app), webhooks
        )
        sweeper.append(thread)

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if _sender_app(sender) is not app:
            return
        for thread in sweeper:
            thread.stop()
        from worker.runtime import shutdown_runtime

        _close_webhook_sender(app)
        shutdown_runtime()

    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid=f"{uid}.init")
    signals.worker_ready.connect(on_worker_ready, weak=False, dispatch_uid=f"{uid}.ready")
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid=f"{uid}.shutdown")

    def on_worker_shutting_down(**_: Any) -> None:
        # At the start of the shutdown, before the pool waits for its threads: none may be
        # left waiting for admission to the quota (sent by the worker's own process, with
        # its host name as sender, so the app cannot be told from it: the runtime is ours).
        from worker.runtime import stop_admitting

        stop_admitting()

    signals.worker_shutting_down.connect(
        on_worker_shutting_down, weak=False, dispatch_uid=f"{uid}.shutting_down"
    )
