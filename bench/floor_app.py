"""A Celery app configured exactly like ours, with one task that only waits (bench.floor).

    celery -A bench.floor_app worker -P threads -c 200 -Q macao-ocr-floor   # env: MACAO_OCR_*

Its task takes a job id, sleeps FLOOR_SLEEP_S (the API call's latency, GIL released) and
returns: what remains is what Celery, kombu and the Redis transport cost per task with our
settings (late acks, task events for Flower, prefetch 1, JSON). Built on first access of
`bench.floor_app.app`, like `worker.app`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

TASK_NAME = "macao_ocr_bench.floor"
QUEUE = "macao-ocr-floor"
# Every setting of ours that changes what the worker does per message.
SHARED_CONF = (
    "broker_url",
    "broker_transport_options",
    "task_serializer",
    "accept_content",
    "event_serializer",
    "task_ignore_result",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "worker_send_task_events",
    "task_send_sent_event",
    "worker_disable_rate_limits",
    "enable_utc",
    "timezone",
)


def create_app() -> Celery:
    """The floor app: our configuration (read off `worker.app.create_app`), one task."""
    from worker.app import create_app as create_ours
    from worker.settings import load_settings

    ours = create_ours(load_settings())
    app = Celery("macao_ocr_floor", set_as_current=False)
    app.conf.update({key: ours.conf[key] for key in SHARED_CONF})
    app.conf.update(task_default_queue=QUEUE, result_backend=None)
    sleep_s = float(os.environ.get("FLOOR_SLEEP_S", "0.3"))

    @app.task(name=TASK_NAME, shared=False, queue=QUEUE, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator,misc]
    def floor(job_id: str) -> str:
        time.sleep(sleep_s)
        return "succeeded"

    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
