"""`macao-ocr tenants policy NAME [--reject ...] [--consider ...] [--ignore ...]`.

Without options it shows the tenant's effective policy: every code, its effect, and whether
that comes from the default, MACAO_OCR_WARNING_POLICY (tenant `default` only) or the tenant.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import database, fail, load_or_exit
from worker.cli.replay_cmd import default_actor
from worker.cli.tenants_group import tenants_app
from worker.decision.policy import Policy, policy_for
from worker.policy_text import PolicyError, overrides_from, policy_text
from worker.reason_codes import Effect

_CODES_HELP = "Codes (repeatable, or comma-separated): warning names or check codes."
TENANT_MAX = 64


@tenants_app.command("policy")
def policy_command(
    name: Annotated[str, typer.Argument(help="The tenant.")],
    reject: Annotated[
        list[str] | None, typer.Option("--reject", help="These codes reject. " + _CODES_HELP)
    ] = None,
    consider: Annotated[
        list[str] | None,
        typer.Option("--consider", help="These codes send to a person. " + _CODES_HELP),
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="These codes are ignored. " + _CODES_HELP)
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Drop the tenant's overrides first (the defaults).")
    ] = False,
    actor: Annotated[str | None, typer.Option(help="Who (default: $USER@host).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show or change a tenant's warning policy. Stored decisions stay as they are until
    `macao-ocr decide` recomputes them; workers apply a change within 30 s."""
    from models.base import utcnow
    from worker.decision.store import load_overrides, save_overrides

    if not name.strip() or len(name) > TENANT_MAX:
        raise fail(f"NAME must be a tenant name of 1 to {TENANT_MAX} characters")
    try:
        groups = {Effect.reject: reject, Effect.consider: consider, Effect.ignore: ignore}
        changes = overrides_from({effect: codes or () for effect, codes in groups.items()})
    except PolicyError as exc:
        raise fail(str(exc)) from None
    settings = load_or_exit()
    changing = bool(changes) or reset
    with database(settings) as factory, factory() as session, session.begin():
        conn = session.connection()
        try:
            stored = {} if reset else load_overrides(conn, name)
        except PolicyError as exc:
            raise fail(f"the stored policy of {name!r} is unreadable: {exc}", 1) from None
        if changing:
            stored.update(changes)
            save_overrides(conn, name, stored, actor=actor or default_actor(), now=utcnow())
    policy = policy_for(name, stored, settings.warning_policy_overrides)
    _show(name, policy, as_json=as_json, changed=changing)


def _show(name: str, policy: Policy, *, as_json: bool, changed: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "tenant": name,
                    "overrides": policy_text(policy.stored),
                    "policy": policy.table(),
                },
                ensure_ascii=False,
            )
        )
        return
    table = Table("code", "source", "effect", "default", "set by", title=f"policy of {name}")
    for row in policy.table():
        table.add_row(row["code"], row["source"], row["effect"], row["default"], row["set_by"])
    Console().print(table)
    if changed:
        typer.echo(
            "policy saved; stored decisions are unchanged until `macao-ocr decide` recomputes them",
            err=True,
        )
