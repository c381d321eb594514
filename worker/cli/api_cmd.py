"""`macao-ocr api`: serve the HTTP API with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.common import load_or_exit


def api(
    host: Annotated[
        str | None, typer.Option(help="Address to bind [env MACAO_OCR_HTTP_HOST; 127.0.0.1].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port [env MACAO_OCR_HTTP_PORT; 8080].", min=1, max=65535)
    ] = None,
    workers: Annotated[int, typer.Option(help="Server processes.", min=1)] = 1,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs). Stateless: run several."""
    import uvicorn

    from worker.privacy.seal import Sealer

    settings = load_or_exit()
    # Refuse here, once, rather than in every server process: no keys, no API.
    Sealer.from_settings(settings)
    uvicorn.run(
        "worker.http.app:create_app_from_env",
        factory=True,
        host=host or settings.http_host,
        port=port or settings.http_port,
        workers=workers,
        # structlog carries our request logs; uvicorn's access log would add a line a request.
        access_log=False,
        log_level=settings.log_level.lower(),
        proxy_headers=False,
    )


def register(app: typer.Typer) -> None:
    app.command("api")(api)
