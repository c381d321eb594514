"""`macao-ocr keys rotate`: every sealed value not under the current key, sealed again.

Chunks of rows in primary-key order, one transaction each, the rows locked (`FOR UPDATE` on
PostgreSQL) so a worker writing the same row waits for the chunk, or the chunk for it. What is
already under the current key is never selected (its envelope starts with the current key id),
so a run stopped half-way continues where it stopped when run again. Images get their keyed
digest recomputed under the current key with their bytes (`Sealer.image_digest`).

The ID-number lookup hashes rotate the same way when a lookup key is set: a hash that does
not begin with the current lookup key's fingerprint (an older key, the bare hash written
before fingerprints, or none at all because the result was stored before lookup was turned
on) is made again from the opened ID number (`rehash_chunk`).

Workers must already run with the new key first in their ring (they then write under it), or
rows they write during the run stay under the old key until the next run."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    LargeBinary,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)

from models import Image, Job, KeptAnswer, Portrait, Result
from worker.privacy.fields import JOB_PERSONAL_COLUMNS, RESULT_PERSONAL_COLUMNS
from worker.privacy.lookup import FINGERPRINT_BYTES, HASH_BYTES, key_fingerprint
from worker.privacy.seal import Sealer

ConnectionScope = Callable[[], Any]


@dataclass(frozen=True)
class Target:
    """One table's sealed columns and the key they are bound to."""

    table: Table
    key: str
    columns: tuple[str, ...]


TARGETS: tuple[Target, ...] = (
    Target(Job.__table__, "id", JOB_PERSONAL_COLUMNS),  # type: ignore[arg-type]
    Target(Result.__table__, "job_id", RESULT_PERSONAL_COLUMNS),  # type: ignore[arg-type]
    Target(Image.__table__, "id", ("data",)),  # type: ignore[arg-type]
    Target(Portrait.__table__, "job_id", ("data",)),  # type: ignore[arg-type]
    Target(KeptAnswer.__table__, "job_id", ("response_json",)),  # type: ignore[arg-type]
)
DEFAULT_CHUNK_ROWS = 500
# The name `count_stale` and the report give the lookup hashes.
LOOKUP_TARGET = "result.id_number_hash"
RESULT: Table = Result.__table__  # type: ignore[assignment]


def envelope_prefix(key_id: str) -> bytes:
    """How every value sealed under `key_id` begins (crypto's envelope: version, id)."""
    kid = key_id.encode()
    return bytes((1, len(kid))) + kid


def _stale(target: Target, prefix: bytes) -> Any:
    """Rows with at least one value not under the key whose envelopes begin with `prefix`."""
    head = bindparam("prefix", prefix, type_=LargeBinary())
    return or_(
        *(
            func.substr(target.table.c[c], 1, len(prefix)) != head
            for c in target.columns
            if c in target.table.c
        )
    )


def count_stale(conn: Connection, sealer: Sealer) -> dict[str, int]:
    """Rows per table holding a value not under the current key."""
    prefix = envelope_prefix(sealer.ring.current_id)
    counts = {
        t.table.name: int(
            conn.execute(
                select(func.count()).select_from(t.table).where(_stale(t, prefix))
            ).scalar_one()
        )
        for t in TARGETS
    }
    if sealer.lookup_key is not None:
        counts[LOOKUP_TARGET] = int(
            conn.execute(
                select(func.count()).select_from(RESULT).where(_stale_lookup(sealer.lookup_key))
            ).scalar_one()
        )
    return counts


def _stale_lookup(lookup_key: bytes) -> Any:
    """Results with an ID number whose lookup hash is not under `lookup_key`."""
    hash_ = RESULT.c.id_number_hash
    head = bindparam("fingerprint", key_fingerprint(lookup_key), type_=LargeBinary())
    return and_(
        RESULT.c.id_number.is_not(None),
        or_(
            hash_.is_(None),
            func.length(hash_) != HASH_BYTES,
            func.substr(hash_, 1, FINGERPRINT_BYTES) != head,
        ),
    )


def rehash_chunk(conn: Connection, sealer: Sealer, after: Any, limit: int) -> list[Any]:
    """Hash again, under the current lookup key, the next `limit` stale lookup hashes after
    job id `after` (None: the first), rows locked; returns their job ids. The caller commits."""
    assert sealer.lookup_key is not None
    key = RESULT.c.job_id
    query = select(key, RESULT.c.id_number).where(_stale_lookup(sealer.lookup_key))
    if after is not None:
        query = query.where(key > after)
    rows = conn.execute(query.order_by(key).limit(limit).with_for_update()).all()
    if not rows:
        return []
    params = [
        {
            "k": job_id,
            "v": sealer.lookup_hash(sealer.open_text("result", "id_number", job_id, blob)),
        }
        for job_id, blob in rows
    ]
    statement = update(RESULT).where(key == bindparam("k")).values(id_number_hash=bindparam("v"))
    conn.execute(statement, params)
    return [job_id for job_id, _ in rows]


def _reseal(sealer: Sealer, target: Target, row: Any, prefix: bytes) -> tuple[dict[str, Any], int]:
    """The row's new values (every column, changed or not) and how many were sealed again."""
    row_id = row[target.key]
    values: dict[str, Any] = {}
    changed = 0
    name = target.table.name
    for column in target.columns:
        blob = row[column]
        if blob is None or bytes(blob[: len(prefix)]) == prefix:
            values[f"v_{column}"] = blob
            continue
        plain = sealer.open(name, column, row_id, blob)
        values[f"v_{column}"] = sealer.seal(name, column, row_id, plain)
        changed += 1
        if name == "image" and column == "data":
            values["v_digest"] = sealer.image_digest(plain)
    return values, changed


def rotate_chunk(
    conn: Connection, sealer: Sealer, target: Target, after: Any, limit: int
) -> tuple[list[Any], int]:
    """Seal again the next `limit` stale rows after primary key `after` (None: the first),
    locked; returns their keys and how many values changed. The caller commits."""
    prefix = envelope_prefix(sealer.ring.current_id)
    table, key = target.table, target.table.c[target.key]
    wanted = [key, *(table.c[c] for c in target.columns)]
    query = select(*wanted).where(_stale(target, prefix))
    if after is not None:
        query = query.where(key > after)
    rows = conn.execute(query.order_by(key).limit(limit).with_for_update()).mappings().all()
    if not rows:
        return [], 0
    params = []
    changed = 0
    for row in rows:
        values, n = _reseal(sealer, target, row, prefix)
        changed += n
        params.append({"k": row[target.key], **values})
    extra: dict[str, Any] = (
        {"digest": bindparam("v_digest")} if target.table.name == "image" else {}
    )
    statement = (
        update(table)
        .where(key == bindparam("k"))
        .values({**{c: bindparam(f"v_{c}") for c in target.columns}, **extra})
    )
    conn.execute(statement, params)
    return [row[target.key] for row in rows], changed


@dataclass
class RotateReport:
    """What a rotation did, per table: rows touched and values sealed again (no values)."""

    key_id: str
    rows: dict[str, int] = field(default_factory=dict)
    values: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "rows": self.rows,
            "values": self.values,
            "rows_total": sum(self.rows.values()),
            "values_total": sum(self.values.values()),
            "remaining": self.remaining,
        }


def rotate(
    transaction: ConnectionScope,
    sealer: Sealer,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[str, int], None] | None = None,
) -> RotateReport:
    """Seal every value not under the current key again, `chunk_rows` rows per transaction
    (`transaction()` opens one and commits it); `progress(table, rows)` after each chunk."""
    report = RotateReport(sealer.ring.current_id)
    for target in TARGETS:
        name = target.table.name
        report.rows[name] = report.values[name] = 0
        after: uuid.UUID | None = None
        while True:
            with transaction() as conn:
                keys, changed = rotate_chunk(conn, sealer, target, after, chunk_rows)
            if not keys:
                break
            after = keys[-1]
            report.rows[name] += len(keys)
            report.values[name] += changed
            if progress is not None:
                progress(name, len(keys))
            if len(keys) < chunk_rows:
                break
    if sealer.lookup_key is not None:
        _rehash_all(transaction, sealer, chunk_rows, report, progress)
    with transaction() as conn:
        report.remaining = count_stale(conn, sealer)
    return report


def _rehash_all(
    transaction: ConnectionScope,
    sealer: Sealer,
    chunk_rows: int,
    report: RotateReport,
    progress: Callable[[str, int], None] | None,
) -> None:
    report.rows[LOOKUP_TARGET] = report.values[LOOKUP_TARGET] = 0
    after: uuid.UUID | None = None
    while True:
        with transaction() as conn:
            keys = rehash_chunk(conn, sealer, after, chunk_rows)
        if not keys:
            return
        after = keys[-1]
        report.rows[LOOKUP_TARGET] += len(keys)
        report.values[LOOKUP_TARGET] += len(keys)
        if progress is not None:
            progress(LOOKUP_TARGET, len(keys))
        if len(keys) < chunk_rows:
            return
