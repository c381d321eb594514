"""Typed SQLAlchemy 2 models: the database is the source of truth for every job."""

from models.access import AccessLog
from models.api import ApiKey, Batch, IdempotencyKey, Tenant
from models.base import Base
from models.decision import DecisionReason, WarningPolicy
from models.job import TERMINAL_STATUSES, Attempt, Image, Job, JobEvent, JobStatus
from models.result import KeptAnswer, Portrait, Result, Warning
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
    "AccessLog",
    "ApiKey",
    "Attempt",
    "Base",
    "Batch",
    "DecisionReason",
    "DeliveryStatus",
    "EventType",
    "IdempotencyKey",
    "Image",
    "Job",
    "JobEvent",
    "JobStatus",
    "KeptAnswer",
    "Portrait",
    "Result",
    "Tenant",
    "Warning",
    "WarningPolicy",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookSecret",
]
