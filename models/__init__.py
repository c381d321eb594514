"""Typed SQLAlchemy 2 models: the database is the source of truth for every job."""

from models.base import Base
from models.job import TERMINAL_STATUSES, Attempt, Image, Job, JobEvent, JobStatus
from models.result import Portrait, Result, Warning
from models.webhook import (
    DeliveryStatus,
    EventType,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
)

__all__ = [
    "TERMINAL_STATUSES",
    "Attempt",
    "Base",
    "DeliveryStatus",
    "EventType",
    "Image",
    "Job",
    "JobEvent",
    "JobStatus",
    "Portrait",
    "Result",
    "Warning",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookSecret",
]
