"""Handing job ids to the broker. A message carries the job id only; the row holds the rest."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from celery import Celery

from kombu.exceptions import OperationalError as _BrokerOperationalError

# What a publish raises when the broker cannot be reached (kombu's, behind this door).
BROKER_ERRORS: tuple[type[BaseException], ...] = (_BrokerOperationalError,)

TASK_NAME = "macao_ocr.process_job"
QUEUE = "macao-ocr"


class Publisher(Protocol):
    """Sends one task message per job id. Raises if the broker cannot take them."""

    def publish(self, job_ids: Sequence[uuid.UUID]) -> None: ...


class CeleryPublisher:
    """Publishes through a Celery app, by task name (the producer never imports the task)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, job_ids: Sequence[uuid.UUID]) -> None:
        """Send every id over one connection of our own.

        Not kombu's producer pool: that pool is global per broker URL, so closing any app
        of the process (a CLI command, a test) would close it under every other app."""
        if not job_ids:
            return
        with self.app.connection_for_write() as connection:
            for job_id in job_ids:
                self.app.send_task(
                    TASK_NAME, args=[str(job_id)], queue=QUEUE, connection=connection
                )


class BrokerUnavailable(ConnectionError):
    """Raised by RecordingPublisher when told to behave like a broker that is down."""


@dataclass
class RecordingPublisher:
    """For tests: remembers what was published; `fail=True` plays a broker that is down;
    `on_publish` sees each batch before it is recorded (to check what is committed by then)."""

    published: list[uuid.UUID] = field(default_factory=list)
    batches: list[list[uuid.UUID]] = field(default_factory=list)
    fail: bool = False
    on_publish: Callable[[Sequence[uuid.UUID]], None] | None = None

    def publish(self, job_ids: Sequence[uuid.UUID]) -> None:
        if self.fail:
            raise BrokerUnavailable("broker unavailable (simulated)")
        if self.on_publish is not None:
            self.on_publish(job_ids)
        self.batches.append(list(job_ids))
        self.published.extend(job_ids)
