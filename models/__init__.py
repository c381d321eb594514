"""Typed SQLAlchemy 2 models: the database is the source of truth for every job."""

from models.base import Base
from models.job import TERMINAL_STATUSES, Attempt, Image, Job, JobEvent, JobStatus
from models.result import KeptAnswer, Portrait, Result, Warning

__all__ = [
    "TERMINAL_STATUSES",
    "Attempt",
    "Base",
    "Image",
    "Job",
    "JobEvent",
    "JobStatus",
    "KeptAnswer",
    "Portrait",
    "Result",
    "Warning",
]
