"""macao-ocr worker package.

The Python client: `from worker import Producer` (see worker/client.py); `submit`,
`submit_many` and `JobSpec` are the producer's functions for callers that bring their own
session factory and publisher.

`celery -A worker worker` finds the Celery app through `worker.app`, which is built on first
access (an entry point), never at import: importing this package reads no environment.
"""

from __future__ import annotations

from typing import Any

_CLIENT = {
    "Producer": "worker.client",
    "JobSpec": "worker.producer",
    "submit": "worker.producer",
    "submit_many": "worker.producer",
}


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.app import get_app

        return get_app()
    if name in _CLIENT:
        import importlib

        return getattr(importlib.import_module(_CLIENT[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
