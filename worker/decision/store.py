"""Tenants' policies in SQL, and the per-process cache the worker reads them through.

The worker decides every success in Python before its one store statement; a query per job
for the policy would add a round trip to that path, so each process keeps each tenant's
policy for `POLICY_CACHE_TTL_S`. A change made with `macao-ocr tenants policy` reaches every
worker within that time; decisions already stored change only with `macao-ocr decide`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Final

import structlog
from sqlalchemy import Connection, Table, bindparam, delete, insert, select, update

from models import WarningPolicy
from worker.decision.policy import Policy, policy_for
from worker.policy_text import stored_overrides
from worker.reason_codes import Effect

log = structlog.get_logger(__name__)

POLICY: Table = WarningPolicy.__table__  # type: ignore[assignment]
POLICY_CACHE_TTL_S: Final = 30.0

_SELECT = select(POLICY.c.rules).where(POLICY.c.tenant == bindparam("tenant"))


def load_overrides(conn: Connection, tenant: str) -> dict[str, Effect]:
    """The tenant's stored overrides ({} when it has none)."""
    raw = conn.execute(_SELECT, {"tenant": tenant}).scalar()
    return {} if raw is None else stored_overrides(raw)


def save_overrides(
    conn: Connection,
    tenant: str,
    overrides: Mapping[str, Effect],
    *,
    actor: str,
    now: datetime,
) -> None:
    """Replace the tenant's overrides (none left: the row goes, the defaults apply)."""
    rules = {code: effect.value for code, effect in overrides.items()}
    exists = conn.execute(_SELECT, {"tenant": tenant}).first() is not None
    if not rules:
        conn.execute(delete(POLICY).where(POLICY.c.tenant == tenant))
    elif exists:
        conn.execute(
            update(POLICY)
            .where(POLICY.c.tenant == tenant)
            .values(rules=rules, updated_at=now, updated_by=actor)
        )
    else:
        conn.execute(
            insert(POLICY).values(tenant=tenant, rules=rules, updated_at=now, updated_by=actor)
        )


class PolicyCache:
    """Each tenant's effective policy, read from SQL at most once per `ttl_s` per process."""

    def __init__(
        self,
        load: Callable[[str], dict[str, Effect]],
        env: Mapping[str, Effect],
        *,
        ttl_s: float = POLICY_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._env = dict(env)
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Policy]] = {}

    def __call__(self, tenant: str) -> Policy:
        """The tenant's policy. A failed read serves the last one known; with none known it
        raises (the caller rides out a database outage, or stores no decision)."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(tenant)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        try:
            policy = policy_for(tenant, self._load(tenant), self._env)
        except Exception as exc:
            if hit is None:
                raise
            log.warning("policy_load_failed", tenant=tenant, error_type=type(exc).__name__)
            return hit[1]
        with self._lock:
            self._cache[tenant] = (now, policy)
        return policy


def engine_loader(
    connect: Callable[[], AbstractContextManager[Connection]],
) -> Callable[[str], dict[str, Effect]]:
    """A loader for PolicyCache reading through `connect()` (an engine's connect)."""

    def load(tenant: str) -> dict[str, Effect]:
        with connect() as conn:
            return load_overrides(conn, tenant)

    return load
