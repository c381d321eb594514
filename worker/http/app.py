"""The application factory: `create_app(settings)` for tests and embedding, and
`create_app_from_env()` for `uvicorn --factory` (reads the environment when called)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from worker.broker.publish import Publisher
from worker.http import routes_batches, routes_health, routes_jobs
from worker.http.backpressure import Backlog
from worker.http.enqueue import Enqueuer
from worker.http.grouped import JobGroups
from worker.http.keys import KeyCache
from worker.http.limits import BodyLimit
from worker.http.problems import Problem, install
from worker.http.schemas import BatchRequest, JobRequest
from worker.http.services import Services
from worker.settings import Settings, load_settings

TITLE = "macao-ocr"
DESCRIPTION = (
    "Read Macao resident ID cards through Tencent Cloud OCR. Authenticate with "
    "`Authorization: Bearer <api_key>` (`macao-ocr tenants create NAME`). Errors are RFC 9457 "
    "`application/problem+json` with a stable `code`."
)

POOL_SIZE = 6
POOL_OVERFLOW = 2
KEY_POOL_SIZE = 2


def _services(settings: Settings, publisher: Publisher | None) -> Services:
    from worker.privacy.seal import Sealer
    from worker.store.engine import (
        TenantSessions,
        make_autocommit_engine,
        make_engine,
        make_sessionmaker,
    )

    # Keys first: an API without them refuses to start (ConfigError naming the variables).
    sealer = Sealer.from_settings(settings)
    # Every request's key lookup is one SELECT: on PostgreSQL without BEGIN and ROLLBACK
    # (None elsewhere, where the pools are SQLite's own).
    # No ping per checkout, as the worker (worker.runtime): a round trip for every session.
    # A connection that died with the server fails its statement as invalidated, once, and
    # the pool replaces it.
    key_engine = make_autocommit_engine(
        settings, pool_size=KEY_POOL_SIZE, max_overflow=0, pool_pre_ping=False
    )
    # Connections per server process: a request holds one at a time, and requests beyond
    # the pool wait for one (several processes must fit PostgreSQL's max_connections).
    pool = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW, "pool_pre_ping": False}
    engine = make_engine(settings, **({} if key_engine is None else pool))
    factory = make_sessionmaker(engine)
    sessions = TenantSessions(engine)
    celery_app = None
    if publisher is None:
        from worker.app import create_app as create_celery_app
        from worker.broker.shared import SharedConnectionPublisher

        celery_app = create_celery_app(settings)
        # A server publishes a job or a batch per request: one held connection, shared.
        publisher = SharedConnectionPublisher(celery_app)
    key_sessions = factory if key_engine is None else make_sessionmaker(key_engine)
    enqueuer = Enqueuer(publisher, sessions)
    return Services(
        settings=settings,
        engine=engine,
        session_factory=factory,
        key_sessions=key_sessions,
        keys=KeyCache(key_sessions, settings.http_key_cache_s),
        sessions=sessions,
        publisher=publisher,
        groups=JobGroups(sessions, sealer, enqueuer),
        enqueuer=enqueuer,
        backlog=Backlog(settings, sessions),
        sealer=sealer,
        celery_app=celery_app,
    )


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Referenced by hand (problem answers; bodies read after the key is checked).
        for model in (Problem, JobRequest, BatchRequest):
            extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in extra.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault(model.__name__, extra)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings, *, publisher: Publisher | None = None) -> FastAPI:
    """The HTTP API over this deployment's database and broker."""
    svc = _services(settings, publisher)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        svc.close()

    app = FastAPI(title=TITLE, version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.services = svc
    install(app)
    for module in (routes_jobs, routes_batches, routes_health):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, batch_limit=settings.http_max_batch_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """For `uvicorn --factory worker.http.app:create_app_from_env` (one per server process)."""
    from worker.logs import configure_logging

    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)
