"""Typed SQLAlchemy 2 models: the database is the source of truth for every job."""

from models.base import Base
from models.job import Attempt, Image, Job, JobEvent, JobStatus, TERMINAL_STATUSES
from models.result import Portrait, Result, Warning

__all__ = [
    "TERMINAL_STATUSES",
    "Attempt",
    "Base",
    "Image",
    "Job",
    "JobEvent",
    "JobStatus",
    "Portrait",
    "Result",
    "Warning",
]
