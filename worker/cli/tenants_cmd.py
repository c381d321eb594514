"""`macao-ocr tenants ...`: one command group; each concern adds its commands in its own module."""

from __future__ import annotations

import typer

from worker.cli import api_keys_cmd, policy_cmd, tenants_webhook_cmd
from worker.cli.tenants_group import tenants_app

# The modules whose import adds their `tenants` subcommands.
CONCERNS = (api_keys_cmd, policy_cmd, tenants_webhook_cmd)


def register(app: typer.Typer) -> None:
    """Add the `tenants` group (with every concern's subcommands) to the CLI."""
    app.add_typer(tenants_app, name="tenants")
