"""Request and response bodies, as the OpenAPI document shows them (generated from these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_BATCH_JOBS = 10_000


class ImageRef(BaseModel):
    """One image: an http(s) `url` the OCR service downloads, or the image's `base64`."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="http(s) URL of a PNG or JPEG.")
    base64: str | None = Field(default=None, description="The PNG or JPEG bytes, base64.")


class JobRequest(BaseModel):
    """One card: its front and/or back, whether to return the portrait, your labels."""

    model_config = ConfigDict(extra="forbid")

    front: ImageRef | None = None
    back: ImageRef | None = None
    portrait: bool = False
    tag: str | None = Field(default=None, description="Your label (at most 200 characters).")
    batch: str | None = Field(default=None, description="A batch label (at most 200).")


class BatchRequest(BaseModel):
    """Up to 10,000 jobs, validated all first: one bad job refuses the batch."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="Your name for the batch (<= 200).")
    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class WarningOut(BaseModel):
    code: int
    name: str


class JobOut(BaseModel):
    """A job as `macao-ocr status --json` prints it (`history` with `?history=true`)."""

    job_id: str
    status: str
    attempts: int
    budget_attempts: int
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    warnings: list[WarningOut]
    tag: str | None
    batch: str | None
    portrait: bool
    created_at: str | None
    enqueued_at: str | None
    started_at: str | None
    finished_at: str | None
    next_attempt_at: str | None
    history: list[dict[str, Any]] | None = None


class JobPage(BaseModel):
    """One page of jobs, oldest first; pass `next_cursor` back as `cursor` (null: the end)."""

    jobs: list[JobOut]
    next_cursor: str | None


class JobRef(BaseModel):
    job_id: str


class BatchCreated(BaseModel):
    batch_id: str
    name: str | None
    jobs: list[JobRef]


class BatchCounts(BaseModel):
    pending: int = Field(description="Not yet succeeded or failed (queued, running, retrying).")
    succeeded: int
    failed: int


class BatchOut(BaseModel):
    batch_id: str
    name: str | None
    created_at: str
    total: int
    counts: BatchCounts
    completed: bool


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000)
    force: bool = Field(default=False, description="Also replay a succeeded job (paid again).")


class ReplayOut(BaseModel):
    """As `macao-ocr replay --json` prints it."""

    dry_run: bool
    matched: int
    replayed: list[str]
    refused: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    published: bool


class Health(BaseModel):
    status: str
    checks: dict[str, str] | None = None
