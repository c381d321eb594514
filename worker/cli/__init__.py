"""`macao-ocr`: the command line. Each command group lives in its own module and registers.

The composition root: the one place outside `demo/` and `emulator/` that imports them (their
commands load fakeredis, Pillow or aiohttp's server only when run)."""

from __future__ import annotations

from typing import Annotated

import typer

from demo import cli as demo_cmd
from worker.cli import (
    api_cmd,
    db_cmd,
    decide_cmd,
    emulator_cmd,
    health_cmd,
    jobs_cmd,
    keys_cmd,
    ops_cmd,
    privacy_cmd,
    read_cmd,
    replay_cmd,
    tenants_cmd,
    webhooks_cmd,
    worker_cmd,
)
from worker.cli.common import BoundaryGroup, CliOptions

app = typer.Typer(
    name="macao-ocr",
    help="Read Macao ID cards through Tencent OCR at the account's full quota.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=BoundaryGroup,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"macao-ocr {version('macao-ocr')}")
        raise typer.Exit()


@app.callback()
def _global(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of a failure.")
    ] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log JSON lines at the configured level.")
    ] = False,
) -> None:
    """Read Macao ID cards through Tencent OCR at the account's full quota."""
    # --debug is read by the error boundary from the command line itself (it must work
    # for failures raised before this callback runs).
    CliOptions.log_json = log_json


for _module in (
    db_cmd,
    jobs_cmd,
    worker_cmd,
    replay_cmd,
    demo_cmd,
    emulator_cmd,
    read_cmd,
    ops_cmd,
    health_cmd,
    tenants_cmd,
    decide_cmd,
    api_cmd,
    webhooks_cmd,
    keys_cmd,
    privacy_cmd,
):
    _module.register(app)


def main() -> None:
    app()
