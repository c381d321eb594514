"""`macao-ocr decide --batch B | --since T`: recompute stored decisions, no API call."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from worker.cli.common import database, fail, load_or_exit, sealer_for
from worker.cli.replay_cmd import _when, default_actor
from worker.errors import InputError


def decide_command(
    batch: Annotated[str | None, typer.Option(help="The succeeded jobs of this batch.")] = None,
    since: Annotated[
        str | None, typer.Option(help="The succeeded jobs that finished at or after this ISO time.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Whose jobs (default: MACAO_OCR_TENANT).")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in each job's history).")] = None,
    actor: Annotated[str | None, typer.Option(help="Who (default: $USER@host).")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Show which decisions would change; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Recompute decisions from stored fields and warnings with the tenant's current policy
    and settings (each job as of the day it was read). No API call is made."""
    from worker.decision.redecide import redecide

    if batch is None and since is None:
        raise fail("name --batch or --since; recomputing everything is never implied")
    since_at = _when("--since", since)
    settings = load_or_exit()
    sealer = sealer_for(settings)
    try:
        with database(settings) as session_factory:
            report = redecide(
                session_factory,
                settings,
                tenant=tenant or settings.tenant,
                batch=batch,
                since=since_at,
                actor=actor or default_actor(),
                reason=reason,
                dry_run=dry_run,
                sealer=sealer,
            )
    except InputError as exc:
        raise fail(exc.message) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    verb = "would change" if dry_run else "changed"
    typer.echo(f"{report.matched} matched, {verb} {len(report.changed)}")
    for change in report.changed:
        reasons = ", ".join(change.reasons) or "-"
        typer.echo(f"  {change.job_id}  {change.before or 'none'} -> {change.after}  ({reasons})")


def register(app: typer.Typer) -> None:
    """Add `decide` to the CLI."""
    app.command("decide")(decide_command)
