"""`macao-ocr tenants create | keys | revoke | list`: tenants of the HTTP API and their keys."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from worker.cli.common import database, fail, load_or_exit
from worker.cli.tenants_group import tenants_app
from worker.errors import InputError, NotFoundError
from worker.tenants import create_key, list_keys, list_tenants, revoke


@tenants_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Tenant name (letters, digits, _ . -).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Create a tenant (or give an existing one another key) and print its API key ONCE."""
    settings = load_or_exit()
    try:
        with database(settings) as factory:
            new = create_key(factory, name)
    except InputError as exc:
        raise fail(exc.message) from None
    if json_out:
        typer.echo(json.dumps({"tenant": new.tenant, "api_key": new.api_key, "key_id": new.key_id}))
        return
    typer.echo(new.api_key)
    typer.echo(
        f"tenant {new.tenant}: key {new.key_id} created; the key above is shown only now "
        "(only its hash is stored)",
        err=True,
    )


@tenants_app.command("keys")
def keys(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """A tenant's key ids, with creation, last use and revocation times."""
    settings = load_or_exit()
    try:
        with database(settings) as factory, factory() as session:
            rows = list_keys(session, name)
    except NotFoundError as exc:
        raise fail(exc.message, 1) from None
    for row in rows:
        if json_out:
            typer.echo(json.dumps(row))
        else:
            state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
            typer.echo(
                f"{row['key_id']}  created {row['created_at']}  "
                f"last used {row['last_used_at'] or 'never'}  {state}"
            )


@tenants_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="Key id (from `tenants keys`).")],
) -> None:
    """Revoke an API key: its next request gets 401, on every server."""
    settings = load_or_exit()
    try:
        with database(settings) as factory:
            tenant = revoke(factory, key_id)
    except NotFoundError as exc:
        raise fail(exc.message, 1) from None
    typer.echo(f"key {key_id} of tenant {tenant} revoked", err=True)


@tenants_app.command("list")
def list_(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """Every tenant and its number of active keys."""
    settings = load_or_exit()
    with database(settings) as factory, factory() as session:
        rows = list_tenants(session)
    for row in rows:
        if json_out:
            typer.echo(json.dumps(row))
        else:
            typer.echo(
                f"{row['tenant']}  active keys {row['active_keys']}  since {row['created_at']}"
            )
