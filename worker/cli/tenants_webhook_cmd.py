"""`macao-ocr tenants webhook NAME --url URL [--rotate-secret] [--json]`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from worker.cli.common import database, fail, load_or_exit
from worker.cli.tenants_group import tenants_app
from worker.errors import InputError
from worker.webhooks.admin import set_endpoint
from worker.webhooks.urls import check_url


@tenants_app.command("webhook")
def webhook_command(
    name: Annotated[str, typer.Argument(help="The tenant (its jobs' tenant name).")],
    url: Annotated[
        str | None, typer.Option("--url", help="Where the tenant's events are POSTed.")
    ] = None,
    rotate_secret: Annotated[
        bool,
        typer.Option(
            "--rotate-secret", help="New signing secret; the current one stays valid 24 h."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Set a tenant's webhook endpoint. A new endpoint's signing secret (and a rotated one)
    is printed once: only then can you copy it."""
    settings = load_or_exit()
    if url is None and not rotate_secret:
        raise fail("give --url URL (and/or --rotate-secret)")
    try:
        if url is not None:
            check_url(url, allow_private=settings.webhook_allow_private)
        with database(settings) as factory:
            change = set_endpoint(factory, name, url, rotate_secret=rotate_secret)
    except InputError as exc:
        raise fail(exc.message) from None
    if as_json:
        typer.echo(json.dumps(change.to_dict()))
        return
    typer.echo(f"tenant {change.tenant}: webhook {change.url}")
    if change.secret is not None:
        typer.echo(f"signing secret (shown once, keep it safe): {change.secret}")
    if change.previous_secret_expires_at is not None:
        typer.echo(
            "the previous secret keeps signing until "
            f"{change.previous_secret_expires_at.isoformat(timespec='seconds')}"
        )
