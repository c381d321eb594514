"""What the routes share in one process: settings, database, publisher, backlog counts.

Every request's database work runs in sessions of its caller's tenant (`Services.sessions`):
on PostgreSQL each transaction is the `macao_ocr_tenant` role with the tenant set, so row-level
security walls the request whatever its queries say. Only the key lookup, which must find the
tenant in the first place, and the readiness probe act as the login's own role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from worker.broker.publish import Publisher
from worker.http.backpressure import Backlog
from worker.http.enqueue import Enqueuer
from worker.http.grouped import JobGroups
from worker.http.keys import KeyCache
from worker.http.problems import unauthorized
from worker.privacy.seal import Sealer
from worker.settings import Settings
from worker.store.engine import TenantSessions
from worker.tenants import Caller


@dataclass
class Services:
    settings: Settings
    engine: Engine
    # The login's own role: API keys (looked up before the tenant is known) and readiness.
    session_factory: sessionmaker[Session]
    # The same role, for the key lookup of every request (autocommit on PostgreSQL).
    key_sessions: sessionmaker[Session]
    # Valid keys remembered for `http_key_cache_s` (the bound on a revocation's delay).
    keys: KeyCache
    # Everything a request does for its caller: walled by row-level security.
    sessions: TenantSessions
    publisher: Publisher
    # Single jobs: stored, then published, together with the requests of the moment.
    groups: JobGroups
    enqueuer: Enqueuer
    backlog: Backlog
    # Seals what the API stores and opens what it shows (worker.privacy.seal).
    sealer: Sealer
    celery_app: Any = None

    def for_tenant(self, tenant: str) -> Settings:
        """The settings the producer and replay scope by tenant, for this caller."""
        return self.settings.model_copy(update={"tenant": tenant})

    def close(self) -> None:
        closer = getattr(self.publisher, "close", None)
        if closer is not None:
            closer()
        if self.celery_app is not None:
            self.celery_app.close()
        self.engine.dispose()
        key_engine = self.key_sessions.kw.get("bind")
        if key_engine is not None and key_engine is not self.engine:
            key_engine.dispose()


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


_bearer = HTTPBearer(auto_error=False, description="An API key from `macao-ocr tenants create`.")


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The tenant and key of the request: 401 unless a live API key is given."""
    if credentials is None or not credentials.credentials:
        raise unauthorized("give an API key: Authorization: Bearer <api_key>")
    keys = services(request).keys
    found = keys.remembered(credentials.credentials)
    if found is None:
        found = await run_in_threadpool(keys.lookup, credentials.credentials)
    if found is None:
        raise unauthorized("unknown or revoked API key")
    return found


CallerDep = Annotated[Caller, Depends(caller)]
ServicesDep = Annotated[Services, Depends(services)]
