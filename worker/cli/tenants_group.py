"""The `tenants` command group object; each concern's module adds its commands to it and
`worker.cli.tenants_cmd` registers the group with every concern loaded."""

from __future__ import annotations

import typer

tenants_app = typer.Typer(
    name="tenants",
    help="Tenants: API keys, webhook endpoint, warning policy.",
    no_args_is_help=True,
)
