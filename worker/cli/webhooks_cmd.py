"""`macao-ocr webhooks list [--failed] [--json]` and `webhooks redeliver ID...|--failed`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from worker.broker.publish import WEBHOOK_QUEUE, WEBHOOK_TASK_NAME, CeleryPublisher
from worker.cli.common import database, fail, load_or_exit
from worker.errors import InputError
from worker.webhooks.admin import list_deliveries, parse_delivery_id, redeliver

webhooks_app = typer.Typer(
    name="webhooks", help="Webhook deliveries: list them, send them again.", no_args_is_help=True
)


@webhooks_app.command("list")
def list_command(
    failed: Annotated[
        bool,
        typer.Option("--failed", help="Only deliveries given up on, or retrying after a failure."),
    ] = False,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """Deliveries, newest first (every tenant's unless --tenant)."""
    settings = load_or_exit()
    with database(settings) as factory:
        rows = list_deliveries(factory, failed=failed, tenant=tenant, limit=limit)
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row))
        else:
            subject = row["job_id"] or f"batch {row['batch']}"
            last = row["last_status_code"] or row["last_error"] or "-"
            typer.echo(
                f"{row['delivery_id']}  {row['tenant']}  {row['type']:<15}  {subject}  "
                f"{row['status']}  attempts {row['attempts']}  last {last}"
            )
    if not rows and not as_json:
        typer.echo("no deliveries", err=True)


@webhooks_app.command("redeliver")
def redeliver_command(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Delivery ids (as `webhooks list` shows them).")
    ] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="Every delivery `webhooks list --failed` shows.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Send deliveries again now, each with a fresh 24 h retry window."""
    settings = load_or_exit()
    if bool(ids) == failed:
        raise fail("give delivery ids or --failed (not both)")
    try:
        parsed = [parse_delivery_id(i) for i in ids or []]
    except InputError as exc:
        raise fail(exc.message) from None
    from worker.app import create_app

    app = create_app(settings)
    try:
        publisher = CeleryPublisher(app, task=WEBHOOK_TASK_NAME, queue=WEBHOOK_QUEUE)
        with database(settings) as factory:
            done, missing, published = redeliver(
                factory, publisher, ids=parsed or None, failed=failed
            )
    finally:
        app.close()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "redelivered": [str(i) for i in done],
                    "not_found": [str(i) for i in missing],
                    "published": published,
                }
            )
        )
    else:
        typer.echo(f"{len(done)} delivery(ies) queued again")
        for one in missing:
            typer.echo(f"not found: {one}", err=True)
        if not published:
            typer.echo("broker unavailable: the sweeper publishes them", err=True)
    if missing:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `webhooks` group."""
    app.add_typer(webhooks_app, name="webhooks")
