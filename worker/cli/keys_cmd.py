"""`macao-ocr keys`: make a data key, and re-encrypt everything under the current one."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from worker.cli.common import database, fail, load_or_exit, sealer_for

keys_app = typer.Typer(
    name="keys",
    help="Data keys: generate a key-ring entry; rotate stored values onto the current key.",
    no_args_is_help=True,
)


@keys_app.command("generate")
def generate(
    key_id: Annotated[
        str | None, typer.Option("--id", help="The key's id (default: k + 8 hex digits).")
    ] = None,
    lookup: Annotated[
        bool,
        typer.Option("--lookup", help="A MACAO_OCR_LOOKUP_KEY instead (base64 of 32 bytes)."),
    ] = False,
) -> None:
    """Print one new key-ring entry `<id>:<base64 key>` (stdout carries nothing else).

    Put it FIRST in MACAO_OCR_DATA_KEYS (comma-separated) to encrypt with it; keep the old
    entries after it until `keys rotate` has moved every value."""
    from worker.errors import ConfigError
    from worker.privacy.crypto import generate_entry, generate_lookup_key

    if lookup:
        typer.echo(generate_lookup_key())
        return
    try:
        entry = generate_entry(key_id)
    except ConfigError as exc:
        raise fail(exc.message) from None
    typer.echo(entry)


@keys_app.command("rotate")
def rotate(
    chunk_rows: Annotated[
        int, typer.Option(min=1, max=100_000, help="Rows per transaction.")
    ] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary.")] = False,
) -> None:
    """Re-encrypt every stored value not under the current key (the ring's first), and hash
    again every ID-number lookup hash not under the first MACAO_OCR_LOOKUP_KEY, in chunks of
    rows, one transaction each, while workers run. Resumable: what is already under the
    current keys is skipped. Counts only; never a value."""
    from worker.store.engine import make_engine
    from worker.store.rotate import count_stale
    from worker.store.rotate import rotate as rotate_all

    settings = load_or_exit()
    sealer = sealer_for(settings)
    with database(settings) as factory, factory() as session:
        todo = count_stale(session.connection(), sealer)
    engine = make_engine(settings)
    stderr = Console(stderr=True)
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=stderr,
            disable=as_json,
        ) as bar:
            tasks = {name: bar.add_task(f"{name:<12}", total=n) for name, n in todo.items()}

            def advance(name: str, rows: int) -> None:
                bar.advance(tasks[name], rows)

            report = rotate_all(engine.begin, sealer, chunk_rows=chunk_rows, progress=advance)
    finally:
        engine.dispose()
    summary = report.to_dict()
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(
            f"key {report.key_id}: {summary['values_total']} value(s) in "
            f"{summary['rows_total']} row(s) re-encrypted"
        )
        left = sum(report.remaining.values())
        if left:
            typer.echo(f"{left} row(s) written under an older key meanwhile: run it again")
    if sum(report.remaining.values()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app)
