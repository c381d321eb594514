"""`macao-ocr db upgrade|downgrade|current`: run the Alembic migrations from anywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from sqlalchemy.exc import SQLAlchemyError

from worker.cli.common import EXIT_RUNTIME, fail
from worker.settings import load_settings

db_app = typer.Typer(help="Create or migrate the database schema.", no_args_is_help=True)


def _database_url() -> str:
    return load_settings().database_url


def _run(action: str, name: str, *args: object) -> None:
    """Alembic's `command.<name>` on this package's migrations (Alembic and Mako imported
    here, not at every CLI start: they are a tenth of a second of each command's start)."""
    from alembic import command

    import migrations

    fn: Callable[..., object] = getattr(command, name)
    try:
        fn(migrations.config(_database_url()), *args)
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
    _run("upgrade", "upgrade", revision)
    typer.echo(f"database upgraded to {revision}", err=True)


@db_app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help='Target revision ("base" drops every table).')],
) -> None:
    """Migrate the database down to REVISION."""
    _run("downgrade", "downgrade", revision)
    typer.echo(f"database downgraded to {revision}", err=True)


@db_app.command()
def current(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Print the database's current revision (nothing printed: not migrated yet)."""
    _run("current", "current", verbose)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.add_typer(db_app, name="db")
