"""What the routes share in one process: settings, database, publisher, backlog counts."""

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
from worker.http.problems import unauthorized
from worker.privacy.seal import Sealer
from worker.settings import Settings
from worker.tenants import Caller, authenticate


@dataclass
class Services:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    publisher: Publisher
    backlog: Backlog
    # Seals what the API stores and opens what it shows (worker.privacy.seal).
    sealer: Sealer
    celery_app: Any = None

    def for_tenant(self, tenant: str) -> Settings:
        """The settings the producer and replay scope by tenant, for this caller."""
        return self.settings.model_copy(update={"tenant": tenant})

    def close(self) -> None:
        if self.celery_app is not None:
            self.celery_app.close()
        self.engine.dispose()


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
    found = await run_in_threadpool(
        authenticate, services(request).session_factory, credentials.credentials
    )
    if found is None:
        raise unauthorized("unknown or revoked API key")
    return found


CallerDep = Annotated[Caller, Depends(caller)]
ServicesDep = Annotated[Services, Depends(services)]
