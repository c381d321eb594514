"""Deleting personal data: a job's images and URLs, a result's personal fields and portrait,
kept answers; and retention, which applies those deletions when their time has come.

Which columns and tables hold personal data is `worker.privacy.fields`' one list; everything
here iterates it and never reads a value (only whether one is there), so it works the same
on plaintext and on encrypted columns.

Images are shared: identical bytes submitted twice by one tenant are stored once
(`worker.store.images`). Ownership is counted, not stored: an image row is deleted only when
no job refers to it any more (`job.front_image_id` / `back_image_id`, each indexed), checked
under the image rows' locks in a statement that starts after the lock is granted, so it sees
every committed job. A producer that reuses an image takes its row `FOR KEY SHARE` first
(`worker.store.images`, `worker.producer`): it either commits its job before the deletion
looks (the image stays) or waits and finds the row gone (it stores the bytes again). The
job's foreign keys make a job pointing at a deleted image impossible in any case.

Retention (`purge`), per finished job:
- a succeeded job's images and URLs after `image_retention_s` (default 0: at the first sweep
  after its success, within `sweep_interval_s`);
- a failed job's images, URLs and kept answer after `failed_image_retention_s` (7 days; until
  then it can be replayed);
- a result's personal fields, lookup hashes and portrait after `result_retention_s` (90
  days); the job keeps its status, codes, warnings, decision and attempt history.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from models import Image, Job, JobStatus, KeptAnswer, Portrait, Result
from models.base import Base, utcnow
from worker.privacy.fields import (
    JOB_PERSONAL_COLUMNS,
    PERSONAL_BLOB_COLUMNS,
    RESULT_LOOKUP_COLUMNS,
    RESULT_PERSONAL_COLUMNS,
)
from worker.settings import Settings

JOB: Table = Job.__table__  # type: ignore[assignment]
IMAGE: Table = Image.__table__  # type: ignore[assignment]
RESULT: Table = Result.__table__  # type: ignore[assignment]
PORTRAIT: Table = Portrait.__table__  # type: ignore[assignment]
KEPT: Table = KeptAnswer.__table__  # type: ignore[assignment]

IMAGE_REFS = ("front_image_id", "back_image_id")
# Jobs (or results) one pass of retention handles per transaction: a sweep stays short and
# never holds many row locks; `purge` repeats passes until nothing is due.
BATCH = 500


def blob_tables() -> list[Table]:
    """The tables whose rows belong to one job and are personal data whole (the portrait,
    kept answers): every PERSONAL_BLOB_COLUMNS table but `image`, which jobs share."""
    tables = Base.metadata.tables
    return [tables[name] for name, _ in PERSONAL_BLOB_COLUMNS if name != IMAGE.name]


@dataclass
class Removed:
    """What was (or, on a dry run, would be) removed, per kind: counts, never values."""

    # Jobs whose images and image URLs were deleted.
    jobs_images: int = 0
    # Image rows deleted (an image another job still uses stays).
    images: int = 0
    # Image URLs deleted.
    urls: int = 0
    # Results whose personal fields and lookup hashes were deleted.
    results: int = 0
    portraits: int = 0
    kept_answers: int = 0

    def add(self, other: Removed) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# -- the deletions (the caller holds the jobs' row locks and commits) -------------------------


def _not_referenced() -> list[Any]:
    """Conditions on IMAGE: no job refers to it (one index probe per column)."""
    return [~exists().where(JOB.c[ref] == IMAGE.c.id) for ref in IMAGE_REFS]


def release_images(conn: Connection, job_ids: Sequence[uuid.UUID], now: datetime) -> Removed:
    """Delete the jobs' image URLs and their references to images, and every image of theirs
    no other job uses; the jobs are marked `images_deleted_at` (replay refuses them)."""
    removed = Removed()
    if not job_ids:
        return removed
    url_held = [case((JOB.c[c].is_not(None), 1), else_=0) for c in JOB_PERSONAL_COLUMNS]
    rows = conn.execute(
        select(*(JOB.c[r] for r in IMAGE_REFS), *url_held).where(JOB.c.id.in_(job_ids))
    ).all()
    image_ids = sorted({row[i] for row in rows for i in range(len(IMAGE_REFS)) if row[i]})
    removed.urls = sum(int(v) for row in rows for v in row[len(IMAGE_REFS) :])
    cleared = conn.execute(
        update(JOB)
        .where(JOB.c.id.in_(job_ids))
        .values(
            **dict.fromkeys(JOB_PERSONAL_COLUMNS),
            **dict.fromkeys(IMAGE_REFS),
            images_deleted_at=func.coalesce(JOB.c.images_deleted_at, now),
        )
    )
    removed.jobs_images = int(cleared.rowcount or 0)
    if image_ids:
        # Lock first, then look in a statement of its own: under READ COMMITTED it sees every
        # job committed before the lock was granted (a producer's, say).
        locked = list(
            conn.execute(
                select(IMAGE.c.id)
                .where(IMAGE.c.id.in_(image_ids))
                .order_by(IMAGE.c.id)
                .with_for_update()
            ).scalars()
        )
        if locked:
            gone = conn.execute(delete(IMAGE).where(IMAGE.c.id.in_(locked), *_not_referenced()))
            removed.images = int(gone.rowcount or 0)
    return removed


def clear_results(conn: Connection, job_ids: Sequence[uuid.UUID], now: datetime) -> Removed:
    """Delete the results' personal fields and lookup hashes (the rows stay, with their codes,
    warnings and decision) and their portraits."""
    removed = Removed()
    if not job_ids:
        return removed
    cleared = conn.execute(
        update(RESULT)
        .where(RESULT.c.job_id.in_(job_ids), RESULT.c.personal_deleted_at.is_(None))
        .values(
            **dict.fromkeys((*RESULT_PERSONAL_COLUMNS, *RESULT_LOOKUP_COLUMNS)),
            personal_deleted_at=now,
        )
    )
    removed.results = int(cleared.rowcount or 0)
    gone = conn.execute(delete(PORTRAIT).where(PORTRAIT.c.job_id.in_(job_ids)))
    removed.portraits = int(gone.rowcount or 0)
    return removed


def delete_kept(conn: Connection, job_ids: Sequence[uuid.UUID]) -> Removed:
    """Delete the jobs' kept answers (what a poison job's replay would have stored)."""
    if not job_ids:
        return Removed()
    gone = conn.execute(delete(KEPT).where(KEPT.c.job_id.in_(job_ids)))
    return Removed(kept_answers=int(gone.rowcount or 0))


def delete_job_blobs(conn: Connection, job_ids: Sequence[uuid.UUID]) -> Removed:
    """Delete every whole-row piece of personal data of the jobs but images (erasure)."""
    removed = Removed()
    if not job_ids:
        return removed
    for table in blob_tables():
        gone = int(conn.execute(delete(table).where(table.c.job_id.in_(job_ids))).rowcount or 0)
        if table.name == PORTRAIT.name:
            removed.portraits += gone
        elif table.name == KEPT.name:
            removed.kept_answers += gone
    return removed


# -- what a deletion would remove (dry runs) --------------------------------------------------


# Job ids: a list, or a SELECT of them (a dry run over everything due: no id list to hold).
JobIds = Sequence[uuid.UUID] | Select[Any]


def count_removable(
    conn: Connection,
    *,
    images_of: JobIds = (),
    results_of: JobIds = (),
    kept_of: JobIds = (),
) -> Removed:
    """What `release_images(images_of)`, `clear_results(results_of)` and the kept answers of
    `kept_of` would remove now; nothing is changed."""
    removed = Removed()
    if _some(images_of):
        held = and_(JOB.c.id.in_(images_of), JOB.c.images_deleted_at.is_(None))
        removed.jobs_images = int(conn.scalar(select(func.count()).where(held)) or 0)
        removed.urls = sum(
            int(conn.scalar(select(func.count()).where(held, JOB.c[c].is_not(None))) or 0)
            for c in JOB_PERSONAL_COLUMNS
        )
        used_by_them = or_(
            *(exists().where(JOB.c[r] == IMAGE.c.id, JOB.c.id.in_(images_of)) for r in IMAGE_REFS)
        )
        used_by_others = or_(
            *(
                exists().where(JOB.c[r] == IMAGE.c.id, JOB.c.id.not_in(images_of))
                for r in IMAGE_REFS
            )
        )
        removed.images = int(
            conn.scalar(
                select(func.count()).select_from(IMAGE).where(used_by_them, ~used_by_others)
            )
            or 0
        )
    if _some(results_of):
        removed.results = _count(
            conn, RESULT, RESULT.c.job_id.in_(results_of), RESULT.c.personal_deleted_at.is_(None)
        )
        removed.portraits = _count(conn, PORTRAIT, PORTRAIT.c.job_id.in_(results_of))
    if _some(kept_of):
        removed.kept_answers = _count(conn, KEPT, KEPT.c.job_id.in_(kept_of))
    return removed


def _some(ids: JobIds) -> bool:
    return isinstance(ids, Select) or bool(ids)


def _count(conn: Connection, table: Table, *where: Any) -> int:
    return int(conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


# -- retention --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cutoffs:
    """Whatever finished (or was stored) before these instants is due."""

    succeeded_images: datetime
    failed_images: datetime
    results: datetime

    @classmethod
    def at(cls, now: datetime, settings: Settings) -> Cutoffs:
        return cls(
            succeeded_images=now - timedelta(seconds=settings.image_retention_s),
            failed_images=now - timedelta(seconds=settings.failed_image_retention_s),
            results=now - timedelta(seconds=settings.result_retention_s),
        )


def _images_due(cut: Cutoffs, status: JobStatus) -> Any:
    before = cut.succeeded_images if status == JobStatus.succeeded else cut.failed_images
    return and_(
        JOB.c.images_deleted_at.is_(None), JOB.c.status == status, JOB.c.finished_at <= before
    )


def _results_due(cut: Cutoffs) -> Any:
    return and_(RESULT.c.personal_deleted_at.is_(None), RESULT.c.created_at <= cut.results)


def _erased_results_held() -> Any:
    # A zombie worker (its lease expired, its job recovered, then erased) may still store
    # an answer it bought before the erasure: this rule deletes it at the next sweep.
    erased = select(JOB.c.id).where(JOB.c.erased_at.is_not(None))
    return and_(RESULT.c.personal_deleted_at.is_(None), RESULT.c.job_id.in_(erased))


def _due_ids(
    conn: Connection, key: Any, where: Any, order: Any, limit: int | None, lock: bool
) -> list[uuid.UUID]:
    query = select(key).where(where).order_by(order)
    if limit is not None:
        query = query.limit(limit)
    if lock:
        # Another sweeper or an erasure holding some: take the others, leave those.
        query = query.with_for_update(skip_locked=True)
    return list(conn.execute(query).scalars())


@dataclass
class PurgeReport:
    """What retention removed (or, on a dry run, would remove) now."""

    removed: Removed
    dry_run: bool = False
    # False when a bounded run stopped with more due (the next sweep continues).
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "complete": self.complete, **self.removed.to_dict()}


def purge(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    max_batches: int | None = None,
    batch: int = BATCH,
) -> PurgeReport:
    """Apply retention now, in transactions of at most `batch` jobs each; `max_batches` per
    kind bounds the work (the sweeper's; None: until nothing is due). A dry run counts and
    changes nothing. The session factory must see every tenant (an operator's)."""
    at = now or utcnow()
    cut = Cutoffs.at(at, settings)
    if dry_run:
        with session_factory() as session:
            return PurgeReport(_count_due(session.connection(), cut), dry_run=True)
    report = PurgeReport(Removed())
    passes: list[tuple[str, Any]] = [
        ("images", _images_due(cut, JobStatus.succeeded)),
        ("failed_images", _images_due(cut, JobStatus.failed)),
        ("results", _results_due(cut)),
        ("results", _erased_results_held()),
    ]
    for kind, where in passes:
        done = 0
        while max_batches is None or done < max_batches:
            with session_factory() as session, session.begin():
                got, removed = _one_batch(session.connection(), kind, where, at, batch)
            report.removed.add(removed)
            done += 1
            if got < batch:
                break
        else:
            report.complete = False
    return report


def _one_batch(
    conn: Connection, kind: str, where: Any, now: datetime, batch: int
) -> tuple[int, Removed]:
    if kind == "results":
        due = _due_ids(conn, RESULT.c.job_id, where, RESULT.c.created_at, batch, lock=False)
        # The job rows first, as erasure and replay take them before a result: the same order
        # everywhere, so no deadlock; one they hold is left to the next pass.
        ids = _lock_jobs(conn, due)
        # All of them held elsewhere: stop here (no progress to make now), not spin.
        return (len(due) if ids else 0), clear_results(conn, ids, now)
    ids = _due_ids(conn, JOB.c.id, where, JOB.c.finished_at, batch, lock=True)
    removed = release_images(conn, ids, now)
    if kind == "failed_images":
        removed.add(delete_kept(conn, ids))
    return len(ids), removed


def _lock_jobs(conn: Connection, ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
    """Lock those of the jobs no one else holds (in id order); their ids."""
    wanted = sorted(ids)
    if not wanted:
        return []
    query = (
        select(JOB.c.id)
        .where(JOB.c.id.in_(wanted))
        .order_by(JOB.c.id)
        .with_for_update(skip_locked=True)
    )
    return list(conn.execute(query).scalars())


def _count_due(conn: Connection, cut: Cutoffs) -> Removed:
    # correlate(None): used inside queries over the same tables, they must stay whole.
    images = (
        select(JOB.c.id)
        .where(or_(_images_due(cut, JobStatus.succeeded), _images_due(cut, JobStatus.failed)))
        .correlate(None)
    )
    failed = select(JOB.c.id).where(_images_due(cut, JobStatus.failed)).correlate(None)
    results = (
        select(RESULT.c.job_id)
        .where(or_(_results_due(cut), _erased_results_held()))
        .correlate(None)
    )
    return count_removable(conn, images_of=images, results_of=results, kept_of=failed)
