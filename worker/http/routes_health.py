"""`/healthz` (the process answers) and `/readyz` (database, Redis and broker answer)."""

from __future__ import annotations

from collections.abc import Callable

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from worker.http.responses import body, problem
from worker.http.schemas import Health
from worker.http.services import Services, ServicesDep

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is up", response_model=None,
            responses={200: body(Health, "Up.")})  # fmt: skip
def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _ping_redis(url: str) -> None:
    client = redis.Redis.from_url(
        url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S
    )
    try:
        client.ping()
    finally:
        client.close()


def _checks(svc: Services) -> dict[str, Callable[[], None]]:
    def database() -> None:
        with svc.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return {
        "database": database,
        "redis": lambda: _ping_redis(svc.settings.state_redis_url),
        "broker": lambda: _ping_redis(svc.settings.broker_url),
    }


@router.get(
    "/readyz",
    summary="Database, Redis and broker answer",
    response_model=None,
    responses={200: body(Health, "Ready."), 503: problem("A dependency does not answer.")},
)
def readyz(svc: ServicesDep) -> JSONResponse:
    results: dict[str, str] = {}
    for name, check in _checks(svc).items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            # The type only: a driver's message may quote the URL and its password.
            results[name] = f"error: {type(exc).__name__}"
    if all(v == "ok" for v in results.values()):
        return JSONResponse({"status": "ok", "checks": results})
    return JSONResponse(
        {
            "type": "urn:macao-ocr:problem:not_ready",
            "title": "Not ready",
            "status": 503,
            "code": "not_ready",
            "detail": "a dependency does not answer",
            "checks": results,
        },
        status_code=503,
        media_type="application/problem+json",
    )
