"""`macao-ocr tenants ...`: one command group; each concern adds its commands in its own module."""

from __future__ import annotations

import typer

tenants_app = typer.Typer(
    name="tenants",
    help="Tenants: API keys, webhook endpoint, warning policy.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the `tenants` group (with every concern's subcommands) to the CLI."""
    # Each concern's module adds its commands to tenants_app when imported.
    from worker.cli import tenants_webhook_cmd  # noqa: F401

    app.add_typer(tenants_app, name="tenants")
