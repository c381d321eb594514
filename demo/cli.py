"""`macao-ocr demo`: the whole pipeline on this machine, with nothing configured."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from demo.run import DemoReport

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CANNOT_RUN = 2
EXIT_INTERRUPTED = 130


def _name(result: Mapping[str, Any]) -> str:
    english = " ".join(p for p in (result.get("en_last_name"), result.get("en_first_name")) if p)
    chinese = "".join(p for p in (result.get("cn_last_name"), result.get("cn_first_name")) if p)
    return " ".join(p for p in (chinese, english) if p)


def _status_markup(status: str, as_expected: bool) -> str:
    colour = {"succeeded": "green", "failed": "red", "refused": "yellow"}.get(status, "magenta")
    mark = "" if as_expected else " [bold red]![/]"
    return f"[{colour}]{status}[/]{mark}"


def _decision_markup(view: dict[str, Any]) -> str:
    decision = view.get("decision")
    if not decision:
        return ""
    colour = {"clear": "green", "consider": "yellow", "reject": "red"}.get(decision, "magenta")
    return f"[{colour}]{decision}[/]"


def render_report(console: Console, report: DemoReport) -> None:
    """The result table, one row per card, then the one-line summary."""
    table = Table(title="macao-ocr demo results", show_lines=False)
    columns = ("job", "card", "status", "decision", "name", "ID number", "valid until", "warnings")
    for column in columns:
        # Long names fold, so the table fits the 160 columns of piped output.
        table.add_column(
            column,
            overflow="fold",
            no_wrap=column in ("job", "ID number"),
            max_width=18 if column == "name" else None,
        )
    # Wide enough for an error code on a line of its own (the decision column took room).
    table.add_column("detail", overflow="fold", ratio=1, min_width=37)
    for row in report.rows:
        view = row.view or {}
        result = view.get("result") or {}
        warnings = ", ".join(w["name"] for w in view.get("warnings", []))
        if row.status == "refused":
            detail = row.refusal or ""
        elif row.status == "failed":
            detail = f"{view.get('error_code')}: {view.get('error_message') or ''}".strip()
        else:
            # Why the decision is what it is: its reasons' codes, then the card's note.
            reasons = ", ".join(r["code"] for r in view.get("reasons", []))
            detail = "; ".join(p for p in (reasons, row.card.note) if p)
        if row.problem:
            detail = f"[red]{row.problem}[/] {detail}"
        table.add_row(
            str(row.job_id)[:8] if row.job_id else "-",
            row.card.label,
            _status_markup(row.status, row.as_expected),
            _decision_markup(view),
            _name(result),
            result.get("id_number") or "",
            result.get("validity_period") or "",
            warnings,
            detail,
        )
    console.print(table)
    console.print(summary_line(report))
    if report.database_path is not None:
        console.print(
            f"kept: {report.database_path} (logs beside it); look inside with "
            f"MACAO_OCR_DATABASE_URL=sqlite:///{report.database_path} macao-ocr jobs"
        )
    if not report.ok and report.worker_log_tail:
        console.print("[dim]last worker log lines:[/]")
        console.print(report.worker_log_tail, markup=False, highlight=False)


def summary_line(report: DemoReport) -> str:
    """`demo: 10 succeeded, 1 failed, 1 refused (12 cards, 14.2s) - all as expected`."""
    counts = report.counts()
    order = ["succeeded", "failed", "refused"]
    parts = [f"{counts[s]} {s}" for s in order] + [
        f"{n} {s}" for s, n in sorted(counts.items()) if s not in order
    ]
    if report.real_service:
        verdict = "every job finished" if report.ok else "NOT every job finished"
    else:
        verdict = "all as expected" if report.ok else "NOT as expected"
    if report.timed_out:
        verdict += " (timed out)"
    return (
        f"demo: {', '.join(parts)} ({len(report.rows)} cards, {report.elapsed_s:.1f}s) - {verdict}"
    )


def demo(
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="Your own card images (real-service mode only).", show_default=False),
    ] = None,
    jobs: Annotated[int, typer.Option(help="How many generated cards (emulator mode).")] = 12,
    keep: Annotated[
        bool, typer.Option(help="Keep the SQLite file and logs under ./.macao-ocr/.")
    ] = False,
    qps: Annotated[
        float | None,
        typer.Option(help="Shared call rate limit (calls/s; 0 = none). Default: 5."),
    ] = None,
    broker: Annotated[
        str,
        typer.Option(
            help="Embedded broker: auto (redis-server if on PATH), redis-server, fakeredis."
        ),
    ] = "auto",
    concurrency: Annotated[int, typer.Option(help="Worker threads.")] = 8,
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Give up waiting after this many seconds.")
    ] = 120.0,
    emulator: Annotated[
        bool,
        typer.Option(
            "--emulator", help="Use the emulator even when TENCENTCLOUD_SECRET_ID is set."
        ),
    ] = False,
) -> None:
    """Run the whole pipeline here: private broker, SQLite, emulator, a real worker.

    With TENCENTCLOUD_SECRET_ID/KEY set (and MACAO_OCR_API_ENDPOINT unset) it reads YOUR images,
    given as arguments, through the real Tencent Cloud service instead.
    """
    from demo.embedded_broker import BrokerError
    from demo.run import (
        DemoError,
        DemoPlan,
        run_demo,
        sigterm_as_interrupt,
        wants_real_service,
    )
    from worker.errors import ConfigError
    from worker.logs import configure_logging
    from worker.settings import Settings

    # The table is the output; only warnings of this process's own logging get through.
    configure_logging(Settings.model_validate({"log_json": False}), level="WARNING")
    # Piped output (CI, `| less`) gets a width the table fits in rather than 80 columns.
    width = None if sys.stdout.isatty() else 160
    console = Console(highlight=False, width=width)
    err = Console(stderr=True, highlight=False, width=width)
    environ = dict(os.environ)
    real = wants_real_service(environ) and not emulator
    default_qps = float(environ.get("MACAO_OCR_QPS", "5")) if real else 5.0
    plan = DemoPlan(
        real_service=real,
        jobs=jobs,
        qps=default_qps if qps is None else qps,
        broker=broker,
        concurrency=concurrency,
        timeout_s=timeout_s,
        keep=keep,
        images=tuple(images or ()),
    )
    if real:
        console.print(
            "[bold yellow]Real service:[/] reading your images through Tencent Cloud with your "
            "credentials; every call counts against your quota."
        )
    else:
        console.print(
            "[bold]Emulator mode:[/] generated SPECIMEN cards read by the bundled Tencent emulator "
            "(no account needed)."
        )

    progress = Progress(
        TextColumn("[bold]jobs[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )
    task_id = progress.add_task("", total=None)

    def on_progress(done: int, total: int, statuses: Mapping[str, int]) -> None:
        # Started on the first report, so start-up errors print without an empty bar.
        if not progress.live.is_started:
            progress.start()
        described = " ".join(f"{s}={n}" for s, n in sorted(statuses.items()))
        progress.update(task_id, completed=done, total=total, description=described)

    def on_event(message: str) -> None:
        console.print(f"[dim]- {message}[/]")

    try:
        with sigterm_as_interrupt():
            try:
                report = run_demo(plan, environ, event=on_event, progress=on_progress)
            finally:
                if progress.live.is_started:
                    progress.stop()
    except KeyboardInterrupt:
        err.print("interrupted: everything the demo started has been stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (DemoError, BrokerError, ConfigError) as exc:
        err.print(f"[red]demo cannot run:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    render_report(console, report)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_UNEXPECTED)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command("demo")(demo)
