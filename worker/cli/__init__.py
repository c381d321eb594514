"""`macao-ocr`: the command line. Each command group lives in its own module and registers.

The composition root: the one place outside `demo/` and `emulator/` that imports them (their
commands load fakeredis, Pillow or aiohttp's server only when run)."""

from __future__ import annotations

import typer

from demo import cli as demo_cmd
from worker.cli import (
    db_cmd,
    emulator_cmd,
    jobs_cmd,
    ops_cmd,
    read_cmd,
    replay_cmd,
    tenants_cmd,
    webhooks_cmd,
    worker_cmd,
)

app = typer.Typer(
    name="macao-ocr",
    help="Read Macao ID cards through Tencent OCR at the account's full quota.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for _module in (
    db_cmd,
    jobs_cmd,
    worker_cmd,
    replay_cmd,
    demo_cmd,
    emulator_cmd,
    read_cmd,
    ops_cmd,
    tenants_cmd,
    webhooks_cmd,
):
    _module.register(app)


def main() -> None:
    app()
