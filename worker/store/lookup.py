"""A person's jobs by ID number, through the keyed hash stored beside the encrypted value.

One query on `result.id_number_hash` (indexed): nothing is decrypted, and the ID number is
never compared in plaintext. `macao-ocr jobs --id-number`, `GET /v1/jobs?id_number=` and
`macao-ocr erase --id-number` all go through `job_ids_by_id_number`."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Job, Result
from worker.errors import ConfigError
from worker.privacy.lookup import id_number_hash

LOOKUP_OFF = (
    "lookup by ID number is off: set MACAO_OCR_LOOKUP_KEY (base64 of 32 random bytes) to "
    "index the ID numbers of results stored from then on"
)


def require_lookup_key(lookup_key: bytes | None) -> bytes:
    """The lookup key, or ConfigError saying lookup by ID number is off and how to turn it on."""
    if lookup_key is None:
        raise ConfigError(LOOKUP_OFF, code="lookup_disabled")
    return lookup_key


def job_ids_by_id_number(
    session: Session, lookup_key: bytes | None, id_number: str, tenant: str | None
) -> list[uuid.UUID]:
    """Ids of the jobs whose result holds `id_number` (spaces and case ignored), oldest
    first; `tenant` None: every tenant (operators). ConfigError without a lookup key."""
    digest = id_number_hash(require_lookup_key(lookup_key), id_number)
    query = (
        select(Job.id)
        .join(Result, Result.job_id == Job.id)
        .where(Result.id_number_hash == digest)
        .order_by(Job.created_at, Job.id)
    )
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    return list(session.scalars(query))
