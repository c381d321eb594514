"""Tenants and their API keys: created, listed, revoked, and matched to a caller.

A key is `mocr_` + 32 random bytes (256 bits, base64url). Only its SHA-256 is stored: a key
that random cannot be guessed from its hash, so a slow password hash would buy nothing and
cost every request. The key is shown once, when created.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import ApiKey, Tenant
from models.base import utcnow
from worker.errors import InputError, NotFoundError

KEY_PREFIX = "mocr_"
KEY_BYTES = 32
# last_used_at is written at most this often per key: not a write per request.
LAST_USE_GRANULARITY = timedelta(seconds=60)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class NewKey:
    """A key just created: `api_key` is shown once and never stored."""

    tenant: str
    key_id: str
    api_key: str

    def __repr__(self) -> str:
        return f"NewKey(tenant={self.tenant!r}, key_id={self.key_id!r})"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant and the id of the key it used (the audit actor)."""

    tenant: str
    key_id: str


def key_sha256(api_key: str) -> str:
    """Hex SHA-256 of a key, as stored."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def check_name(name: str) -> None:
    """A tenant name: 1-64 of letters, digits, `_ . -`, starting with a letter or digit."""
    if not _NAME.fullmatch(name):
        raise InputError(
            "tenant_name",
            "tenant name must be 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (rule tenant_name)",
        )


def create_key(session_factory: sessionmaker[Session], name: str) -> NewKey:
    """Create the tenant if it is new, and give it a new key (an existing tenant gets one
    more key: rotate, then revoke the old one)."""
    check_name(name)
    api_key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    key_id = "key_" + secrets.token_hex(8)
    with session_factory() as session, session.begin():
        if session.get(Tenant, name) is None:
            session.add(Tenant(name=name, created_at=utcnow()))
            session.flush()
        session.add(
            ApiKey(id=key_id, tenant=name, key_sha256=key_sha256(api_key), created_at=utcnow())
        )
    return NewKey(tenant=name, key_id=key_id, api_key=api_key)


def list_tenants(session: Session) -> list[dict[str, object]]:
    """Every tenant with its number of active keys."""
    active = (
        select(ApiKey.tenant, func.count().label("n"))
        .where(ApiKey.revoked_at.is_(None))
        .group_by(ApiKey.tenant)
        .subquery()
    )
    rows = session.execute(
        select(Tenant.name, Tenant.created_at, func.coalesce(active.c.n, 0))
        .outerjoin(active, active.c.tenant == Tenant.name)
        .order_by(Tenant.name)
    ).all()
    return [
        {"tenant": name, "created_at": created.isoformat(), "active_keys": int(n)}
        for name, created, n in rows
    ]


def list_keys(session: Session, name: str) -> list[dict[str, object]]:
    """A tenant's keys (ids, creation, last use, revocation); NotFoundError if unknown."""
    if session.get(Tenant, name) is None:
        raise NotFoundError(f"no tenant named {name!r}")
    keys = session.scalars(
        select(ApiKey).where(ApiKey.tenant == name).order_by(ApiKey.created_at, ApiKey.id)
    ).all()
    return [
        {
            "key_id": k.id,
            "created_at": _iso(k.created_at),
            "last_used_at": _iso(k.last_used_at),
            "revoked_at": _iso(k.revoked_at),
        }
        for k in keys
    ]


def revoke(session_factory: sessionmaker[Session], key_id: str) -> str:
    """Revoke a key (at once, for every server); returns its tenant. NotFoundError if unknown."""
    with session_factory() as session, session.begin():
        key = session.get(ApiKey, key_id)
        if key is None:
            raise NotFoundError(f"no API key with id {key_id!r}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
        return key.tenant


def authenticate(session_factory: sessionmaker[Session], api_key: str) -> Caller | None:
    """The caller a key belongs to, or None (unknown or revoked). Records its last use."""
    digest = key_sha256(api_key)
    now = utcnow()
    with session_factory() as session:
        row = session.execute(
            select(ApiKey.id, ApiKey.tenant, ApiKey.last_used_at).where(
                ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None)
            )
        ).first()
        if row is None:
            return None
        key_id, tenant, last_used = row
        if last_used is None or now - last_used >= LAST_USE_GRANULARITY:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
            session.commit()
    return Caller(tenant=tenant, key_id=key_id)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
