"""`macao-ocr read FRONT [--back BACK]`: read one card through the client, no queue; the
database only for the access log (the read is logged before the call)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import CliError, database, os_actor
from worker.errors import ApiError, ConfigError, InputError, MacaoOcrError
from worker.logs import configure_logging
from worker.settings import Settings, load_settings
from worker.store.views import result_view
from worker.tencent.client import ClientConfig, OcrClient, make_session
from worker.tencent.types import ImageInput, OcrRequest, OcrResult

EXIT_API_ERROR = 1
EXIT_USAGE = 2


def image_input(source: str, side: str) -> ImageInput:
    """A URL (anything with a scheme, checked later by the validator) or a file's bytes."""
    if "://" in source:
        return ImageInput(url=source)
    path = Path(source)
    try:
        return ImageInput(data=path.read_bytes())
    except OSError as exc:
        raise InputError(
            "unreadable_file", f"{side} image file {source} cannot be read: {exc.strerror}"
        ) from None


def result_json(result: OcrResult) -> dict[str, Any]:
    """Every field under the snake_case of its API name (the shape `status --json` uses)."""
    return result_view(result, result.warnings)


async def read_card(settings: Settings, request: OcrRequest) -> OcrResult:
    """One call with a session of its own, closed before returning."""
    config = ClientConfig.from_settings(settings)
    async with make_session(settings) as session:
        return await OcrClient(session, config).recognize(request)


def _log_read(settings: Settings) -> None:
    from worker.store import access

    with database(settings, tenant=settings.tenant) as factory:
        access.record(
            factory,
            actor=os_actor(),
            how=access.CLI_READ,
            reads=[access.Read(tenant=settings.tenant, job_id=None)],
        )


def _fail(exc: MacaoOcrError) -> CliError:
    detail = exc.message
    request_id = getattr(exc, "request_id", None)
    if request_id:
        detail += f" (RequestId {request_id})"
    exit_code = EXIT_API_ERROR if isinstance(exc, ApiError) else EXIT_USAGE
    return CliError(f"{exc.code}: {detail}", code=exc.code, exit_code=exit_code)


def _print_table(data: dict[str, Any]) -> None:
    table = Table(title="Macao ID card", show_header=True)
    table.add_column("field")
    table.add_column("value")
    for key, value in data.items():
        if key == "warnings":
            shown = ", ".join(f"{w['name']} ({w['code']})" for w in value) or "none"
        else:
            shown = "" if value is None else str(value)
        table.add_row(key, shown)
    Console().print(table)


def read(
    front: Annotated[str, typer.Argument(help="Front image: a file path or an http(s) URL.")],
    back: Annotated[
        str | None, typer.Option("--back", help="Back image: a file path or an http(s) URL.")
    ] = None,
    portrait_out: Annotated[
        Path | None,
        typer.Option("--portrait-out", help="Ask for the portrait and write it to this file."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log the API call.")] = False,
) -> None:
    """Read one card directly through the API and print every field."""
    try:
        settings = load_settings()
        configure_logging(settings, level=None if verbose else "WARNING")
        request = OcrRequest(
            front=image_input(front, "front"),
            back=None if back is None else image_input(back, "back"),
            portrait=portrait_out is not None,
        )
        # The producer's pre-flight: a call is bought only for what could be read.
        from worker.producer import make_preflight

        make_preflight(settings).check(request)
        # Logged before the call (a read that cannot be logged buys nothing and shows
        # nothing): what it shows is a person's card, with no job to name.
        ClientConfig.from_settings(settings)  # missing credentials: said before anything
        _log_read(settings)
        result = asyncio.run(read_card(settings, request))
    except (ConfigError, InputError, ApiError) as exc:
        raise _fail(exc) from None
    if portrait_out is not None:
        if result.portrait:
            portrait_out.write_bytes(result.portrait)
        else:
            typer.echo("warning: the API returned no portrait", err=True)
    data = result_json(result)
    if as_json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    else:
        _print_table(data)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command("read")(read)
