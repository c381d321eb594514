"""Batch rows: what a batch's completion is judged by (worker.store.terminal).

Every batch has a row with its `total` and terminal counters: the HTTP API's `POST /v1/batches`
makes one per request (a random id), and a batch label given to `submit`, `submit_many` or the
CLI (`--batch`, a manifest) has one per tenant and label, whose id is derived from both
(`label_batch_id`), so every producer of a label counts into the same row without a lookup.
Jobs are counted into a row in the transaction that stores them, or before it: a row's total
is never below its committed jobs, so it can never look complete while jobs are missing.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Table, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from models import Batch
from models.base import utcnow

BATCH: Table = Batch.__table__  # type: ignore[assignment]
# Fixed: ids derived from it are stored; changing it would split every label's batch in two.
LABEL_NAMESPACE = uuid.UUID("6f1c2d0e-4b7a-5c1e-9a53-2f0d7b8e4c11")


def label_batch_id(tenant: str, label: str) -> uuid.UUID:
    """The id of the batch row of `label` within `tenant` (a label cannot hold NUL)."""
    return uuid.uuid5(LABEL_NAMESPACE, f"{tenant}\x00{label}")


def count_into_label(session: Session, tenant: str, label: str, jobs: int) -> uuid.UUID:
    """Add `jobs` to the label's batch total, making its row on first use; returns its id.

    The row stays locked until the caller's transaction ends: workers finishing the label's
    earlier jobs wait that long to move its counters."""
    batch_id = label_batch_id(tenant, label)
    dialect = session.get_bind().dialect.name
    maker: Any = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = maker(BATCH).values(
        id=batch_id,
        tenant=tenant,
        name=label,
        total=jobs,
        succeeded=0,
        failed=0,
        created_at=utcnow(),
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[BATCH.c.id], set_={"total": BATCH.c.total + statement.excluded.total}
        )
    )
    return batch_id


def uncount(session: Session, batch_id: uuid.UUID, jobs: int) -> None:
    """Take back `jobs` counted in but never stored (their submission failed)."""
    session.execute(update(BATCH).where(BATCH.c.id == batch_id).values(total=BATCH.c.total - jobs))
