"""The ID-number lookup rotates like the data keys: every key of MACAO_OCR_LOOKUP_KEY is
searched, and `keys rotate` hashes again, under the first, what an older key, the bare hash
of earlier releases or no key at all left behind."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import JobStatus, Result
from tests.fixtures.workers import TEST_DEFAULTS, sealed_job
from worker.privacy.crypto import KeyRing
from worker.privacy.lookup import HASH_BYTES, key_fingerprint, search_hashes
from worker.privacy.seal import Sealer
from worker.settings import Settings
from worker.store.lookup import job_ids_by_id_number
from worker.store.rotate import LOOKUP_TARGET, count_stale, rotate

ID_NUMBER = "1234567(8)"
RING = KeyRing.parse(TEST_DEFAULTS["MACAO_OCR_DATA_KEYS"])
OLD, NEW = secrets.token_bytes(32), secrets.token_bytes(32)


def _add(session: Session, sealer: Sealer, id_number: str | None) -> uuid.UUID:
    job = sealed_job(
        front_url="https://cards.example/front.jpg",
        tenant="acme",
        status=JobStatus.succeeded,
        created_at=datetime(2030, 1, 2, tzinfo=UTC),
    )
    session.add(job)
    session.flush()
    values = {"job_id": job.id, "request_id": "req", "id_number": id_number}
    session.add(Result(**sealer.seal_result(job.id, values)))
    session.flush()
    return job.id


def test_every_listed_key_is_searched_and_rotation_rehashes_under_the_first(
    db_session: Session,
    transactions: Callable[[], AbstractContextManager[sa.Connection]],
) -> None:
    under_old = _add(db_session, Sealer(RING, OLD), ID_NUMBER)
    before_fingerprints = _add(db_session, Sealer(RING, OLD), ID_NUMBER)
    bare = search_hashes([OLD], ID_NUMBER)[1]
    db_session.execute(
        update(Result).where(Result.job_id == before_fingerprints).values(id_number_hash=bare)
    )
    before_lookup = _add(db_session, Sealer(RING), ID_NUMBER)
    erased = _add(db_session, Sealer(RING, OLD), None)
    other_person = _add(db_session, Sealer(RING, OLD), "7654321(0)")
    db_session.flush()

    rotating = Sealer(RING, lookup_keys=[NEW, OLD])
    found = job_ids_by_id_number(db_session, rotating.lookup_keys, ID_NUMBER, "acme")
    # Mid-rotation nothing hashed under a listed key is hidden; unhashed rows are not found.
    assert set(found) == {under_old, before_fingerprints}
    assert job_ids_by_id_number(db_session, [NEW], ID_NUMBER, "acme") == []

    stale = count_stale(db_session.connection(), rotating)
    assert stale[LOOKUP_TARGET] == 4  # the three of ID_NUMBER and other_person; not `erased`

    report = rotate(transactions, rotating, chunk_rows=2)
    assert report.values[LOOKUP_TARGET] == 4
    assert report.remaining[LOOKUP_TARGET] == 0

    found = job_ids_by_id_number(db_session, [NEW], ID_NUMBER, "acme")
    assert set(found) == {under_old, before_fingerprints, before_lookup}
    assert job_ids_by_id_number(db_session, [NEW], "7654321(0)", "acme") == [other_person]
    rows = db_session.execute(select(Result.job_id, Result.id_number_hash))
    hashes = {job_id: digest for job_id, digest in rows}
    assert hashes[erased] is None
    for job_id in (under_old, before_fingerprints, before_lookup, other_person):
        digest = hashes[job_id]
        assert digest is not None and len(digest) == HASH_BYTES
        assert digest[:4] == key_fingerprint(NEW)
    # Resumable: a second run finds nothing left to do.
    again = rotate(transactions, rotating, chunk_rows=2)
    assert again.values[LOOKUP_TARGET] == 0


def test_settings_list_lookup_keys_current_first() -> None:
    text = ",".join(base64.b64encode(k).decode() for k in (NEW, OLD))
    settings = Settings(data_keys=TEST_DEFAULTS["MACAO_OCR_DATA_KEYS"], lookup_key=text)
    assert settings.lookup_keys_bytes() == (NEW, OLD)
    sealer = Sealer.from_settings(settings)
    assert sealer.lookup_key == NEW and sealer.lookup_keys == (NEW, OLD)
    assert sealer.lookup_hash(ID_NUMBER) == search_hashes([NEW], ID_NUMBER)[0]
