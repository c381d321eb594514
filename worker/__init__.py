"""macao-ocr worker package.

`celery -A worker worker` finds the Celery app through `worker.app`, which is built on first
access (an entry point), never at import: importing this package reads no environment.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.app import get_app

        return get_app()
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
