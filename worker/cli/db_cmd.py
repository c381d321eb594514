"""`macao-ocr db upgrade|downgrade|current`: run the Alembic migrations from anywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from alembic import command
from sqlalchemy.exc import SQLAlchemyError

import migrations
from worker.cli.common import EXIT_RUNTIME, fail
from worker.settings import load_settings

db_app = typer.Typer(help="Create or migrate the database schema.", no_args_is_help=True)


def _database_url() -> str:
    return load_settings().database_url


def _run(action: str, fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except SQLAlchemyError as exc:
        # The driver's own message (host, port, reason); the URL and its password stay out.
        reason = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()
        raise fail(
            f"database {action} failed: {reason[0] if reason else type(exc).__name__}",
            EXIT_RUNTIME,
            error="database_error",
        ) from None


@db_app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database (MACAO_OCR_DATABASE_URL) up to REVISION (default: head)."""
    _run("upgrade", command.upgrade, migrations.config(_database_url()), revision)
    typer.echo(f"database upgraded to {revision}", err=True)


@db_app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help='Target revision ("base" drops every table).')],
) -> None:
    """Migrate the database down to REVISION."""
    _run("downgrade", command.downgrade, migrations.config(_database_url()), revision)
    typer.echo(f"database downgraded to {revision}", err=True)


@db_app.command()
def current(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Print the database's current revision (nothing printed: not migrated yet)."""
    _run("current", command.current, migrations.config(_database_url()), verbose)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.add_typer(db_app, name="db")
