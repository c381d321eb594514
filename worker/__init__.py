"""macao-ocr: read Macao resident ID cards through Tencent OCR at the account's full quota.

What an onboarding backend uses (everything else in the package is internal):
- `Producer` — built from settings (`Producer.from_env()`): `submit`, `submit_many`,
  `get_job`, `wait`;
- `submit`, `submit_many`, `get_job` — the same as plain functions over a session factory;
- `JobSpec` — one card of a `submit_many`.

Importing this package reads no environment and starts nothing: names load on first use.
`celery -A worker worker` finds the Celery app as `worker.celery` (built on first access).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.producer import JobSpec, submit, submit_many
    from worker.service import Producer, get_job

__all__ = ["JobSpec", "Producer", "get_job", "submit", "submit_many"]

_PUBLIC = {
    "Producer": "worker.service",
    "get_job": "worker.service",
    "submit": "worker.producer",
    "submit_many": "worker.producer",
    "JobSpec": "worker.producer",
}


def __getattr__(name: str) -> Any:
    if name == "celery":
        from worker.app import get_app

        return get_app()
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
