"""A person's jobs by ID number, through the keyed hash stored beside the encrypted value.

One query on `result.id_number_hash` (indexed): nothing is decrypted, and the ID number is
never compared in plaintext. `macao-ocr jobs --id-number`, `GET /v1/jobs?id_number=` and
`macao-ocr erase --id-number` all go through `job_ids_by_id_number`. Every lookup key of the
ring is searched, so a rotation under way (`keys rotate`) never hides a job."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Job, Result
from worker.errors import ConfigError
from worker.privacy.lookup import search_hashes

LOOKUP_OFF = (
    "lookup by ID number is off: set MACAO_OCR_LOOKUP_KEY (base64 of 32 random bytes) to "
    "index the ID numbers of results stored from then on"
)


def require_lookup_keys(lookup_keys: bytes | Sequence[bytes] | None) -> tuple[bytes, ...]:
    """The lookup keys (current first), or ConfigError saying lookup by ID number is off and
    how to turn it on."""
    keys = (lookup_keys,) if isinstance(lookup_keys, bytes) else tuple(lookup_keys or ())
    if not keys:
        raise ConfigError(LOOKUP_OFF, code="lookup_disabled")
    return keys


def job_ids_by_id_number(
    session: Session,
    lookup_keys: bytes | Sequence[bytes] | None,
    id_number: str,
    tenant: str | None,
) -> list[uuid.UUID]:
    """Ids of the jobs whose result holds `id_number` (spaces and case ignored), oldest
    first; `tenant` None: every tenant (operators). ConfigError without a lookup key."""
    digests = search_hashes(require_lookup_keys(lookup_keys), id_number)
    query = (
        select(Job.id)
        .join(Result, Result.job_id == Job.id)
        .where(Result.id_number_hash.in_(digests))
        .order_by(Job.created_at, Job.id)
    )
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    return list(session.scalars(query))
