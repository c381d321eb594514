"""`macao-ocr health`: an orchestrator's probe of the database, Redis and the broker."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from worker.cli.common import EXIT_RUNTIME, load_or_exit


def health(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Exit 0 when the database (at the schema's head), Redis and the broker answer.

    Otherwise exit 1 and name each part that failed and what to do. Credentials are not
    needed (a probe may run without them).
    """
    from worker.checks import run_checks

    settings = load_or_exit()
    checks = run_checks(settings, credentials=False)
    healthy = all(check.ok for check in checks)
    if as_json:
        body = {"healthy": healthy, "checks": [check.to_json() for check in checks]}
        typer.echo(json.dumps(body))
    else:
        for check in checks:
            typer.echo(check.line(), err=not check.ok)
    if not healthy:
        raise typer.Exit(EXIT_RUNTIME)


def register(app: typer.Typer) -> None:
    """Add `macao-ocr health`."""
    app.command("health")(health)
