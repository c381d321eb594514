"""`macao-ocr submit | status | jobs`: thin faces on worker.producer and worker.store.views."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Column, Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobStatus
from worker.broker.publish import Publisher
from worker.cli.common import database, fail, load_or_exit, make_publisher
from worker.errors import InputError, StateUnavailable
from worker.producer import MAX_ROWS, JobSpec, ManifestError, read_manifest, submit_many
from worker.producer import submit as submit_one
from worker.settings import Settings
from worker.store.views import job_view, not_found_view

stderr = Console(stderr=True)


def _emit(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, default=str))


# -- submit


def _specs(
    front: str | None,
    back: str | None,
    manifest: Path | None,
    portrait: bool,
    tag: str | None,
    max_rows: int = MAX_ROWS,
) -> list[JobSpec]:
    if manifest is not None:
        if front is not None or back is not None or tag is not None:
            raise fail("give either FRONT [--back] [--tag] or --manifest, not both")
        specs = read_manifest(manifest, portrait=portrait, max_rows=max_rows)
        if not specs:
            raise fail(f"manifest has no rows: {manifest} (rule empty_manifest)")
        return specs
    if front is None and back is None:
        raise fail("give a FRONT image (file or http(s) URL), --back, or --manifest")
    if front is None:
        # The API reads ImageUrl/ImageBase64 as the front: a back alone buys MissingParameter.
        raise fail("--back needs a FRONT image too: the API reads the front side (rule no_front)")
    return [JobSpec(front=front, back=back, portrait=portrait, tag=tag)]


def _print_input_error(exc: InputError) -> None:
    if isinstance(exc, ManifestError):
        typer.echo(
            f"error: {len(exc.problems)} bad row(s) in the manifest, nothing submitted:", err=True
        )
        for problem in exc.problems:
            typer.echo(f"  line {problem.line}: {problem.message}", err=True)
    else:
        typer.echo(f"error: {exc.message}", err=True)


def submit(
    front: Annotated[
        str | None, typer.Argument(help="Front image: a file path or an http(s) URL.")
    ] = None,
    back: Annotated[str | None, typer.Option(help="Back image: file path or URL.")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="CSV with columns front, back, tag (one job a row).")
    ] = None,
    portrait: Annotated[bool, typer.Option(help="Also return the card's portrait.")] = False,
    tag: Annotated[str | None, typer.Option(help="Your label for the job.")] = None,
    batch: Annotated[str | None, typer.Option(help="Name the jobs' batch.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    max_rows: Annotated[
        int, typer.Option("--max-rows", min=1, help="Refuse a manifest of more rows than this.")
    ] = MAX_ROWS,
    base_dir: Annotated[
        Path | None,
        typer.Option(
            "--base-dir",
            help="Every manifest file path must lie inside this folder (symlinks resolved).",
        ),
    ] = None,
) -> None:
    """Validate and queue cards for reading. Bad input: nothing is submitted."""
    settings = load_or_exit()
    if base_dir is not None and not base_dir.is_dir():
        raise fail(f"--base-dir is not a folder: {base_dir}")
    try:
        specs = _specs(front, back, manifest, portrait, tag, max_rows)
    except InputError as exc:
        _print_input_error(exc)
        raise typer.Exit(2) from None
    publisher, app = make_publisher(settings)
    try:
        with database(settings) as factory:
            ids = _submit(
                factory,
                publisher,
                settings,
                specs,
                batch,
                manifest=manifest is not None,
                max_rows=max_rows,
                base_dir=base_dir,
            )
            with factory() as session:
                jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids))).all()}
    finally:
        app.close()
    unpublished = 0
    for spec, job_id in zip(specs, ids, strict=True):
        enqueued = jobs[job_id].enqueued_at is not None
        unpublished += not enqueued
        if json_out:
            _emit(
                {"job_id": str(job_id), "status": "queued", "tag": spec.tag, "enqueued": enqueued}
            )
        else:
            typer.echo(str(job_id))
    if unpublished:
        typer.echo(
            f"warning: the broker was unreachable for {unpublished} job(s); they are saved and "
            "a worker's sweeper will enqueue them",
            err=True,
        )
    elif not json_out:
        typer.echo(f"{len(ids)} job(s) queued", err=True)


def _submit(
    factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    specs: Sequence[JobSpec],
    batch: str | None,
    *,
    manifest: bool,
    max_rows: int = MAX_ROWS,
    base_dir: Path | None = None,
) -> list[uuid.UUID]:
    try:
        if not manifest:
            spec = specs[0]
            return [
                submit_one(
                    factory,
                    publisher,
                    settings,
                    spec.front,
                    spec.back,
                    portrait=spec.portrait,
                    tag=spec.tag,
                    batch=batch,
                )
            ]
        with Progress(
            TextColumn("submitting"), BarColumn(), MofNCompleteColumn(), console=stderr
        ) as bar:
            task = bar.add_task("submit", total=len(specs))
            return submit_many(
                factory,
                publisher,
                settings,
                specs,
                batch=batch,
                progress=lambda done, _total: bar.update(task, completed=done),
                max_rows=max_rows,
                base_dir=base_dir,
            )
    except InputError as exc:
        _print_input_error(exc)
        raise typer.Exit(2) from None


# -- status


def read_pause(settings: Settings) -> tuple[dict[str, Any] | None, bool]:
    """(the account pause or None, whether the pause state could be read)."""
    from worker.quota.circuit_redis import read_pause_sync

    try:
        pause = read_pause_sync(settings.state_redis_url)
    except (StateUnavailable, ValueError):
        # Redis out of reach (or a pause written by another version): jobs still print.
        return None, False
    if pause is None:
        return None, True
    return {"code": pause.code, "message": pause.message, "since": pause.since.isoformat()}, True


def _parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _print_job(view: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("job", view["job_id"])
    table.add_row("status", view["status"])
    if view["status"] == "not_found":
        stderr.print(table)
        return
    table.add_row("api calls", str(view["attempts"]))
    for key in ("tag", "batch", "created_at", "finished_at", "next_attempt_at"):
        if view.get(key):
            table.add_row(key.replace("_", " "), str(view[key]))
    if view["error_code"]:
        table.add_row("last error", f"{view['error_code']}: {view['error_message'] or ''}")
    result = view["result"]
    if result is not None:
        for key, value in result.items():
            if key != "warnings" and value is not None:
                table.add_row(key, str(value))
    warnings = ", ".join(f"{w['name']} ({w['code']})" for w in view["warnings"]) or "none"
    if result is not None:
        table.add_row("warnings", warnings)
    Console().print(table)
    typer.echo("")


def status(
    job_ids: Annotated[list[str], typer.Argument(help="One or more job ids.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    history: Annotated[bool, typer.Option(help="Every API call and event.")] = False,
) -> None:
    """Show jobs: status, API calls, last error, result and warnings. Exit 1 if one is unknown."""
    settings = load_or_exit()
    pause, pause_known = read_pause(settings)
    missing = 0
    views: list[dict[str, Any]] = []
    with database(settings) as factory, factory() as session:
        for text in job_ids:
            job_id = _parse_id(text)
            job = None
            if job_id is not None:
                job = session.scalars(
                    select(Job).where(Job.id == job_id, Job.tenant == settings.tenant)
                ).first()
            if job is None:
                missing += 1
                views.append(not_found_view(text))
            else:
                views.append(job_view(session, job, history=history))
    if not json_out:
        _print_pause(pause, pause_known)
    for view in views:
        if json_out:
            if view["status"] != "not_found":
                view["paused"] = pause
                if not pause_known:
                    view["pause_state"] = "unavailable"
            _emit(view)
        else:
            _print_job(view)
    if missing:
        raise typer.Exit(1)


def _print_pause(pause: dict[str, Any] | None, known: bool) -> None:
    if not known:
        typer.echo("note: account pause state unavailable (Redis unreachable)", err=True)
    elif pause is not None:
        typer.echo(
            f"ACCOUNT PAUSED since {pause['since']}: {pause['code']}: {pause['message']} "
            "(jobs stay queued until it resumes)"
        )


# -- jobs


def jobs(
    status_: Annotated[
        JobStatus | None, typer.Option("--status", help="Only jobs in this status.")
    ] = None,
    error_code: Annotated[
        str | None, typer.Option(help="Only jobs whose last error is this.")
    ] = None,
    batch: Annotated[str | None, typer.Option(help="Only this batch.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only this tag.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (newest first).")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """List this tenant's jobs, newest first."""
    settings = load_or_exit()
    query = select(Job).where(Job.tenant == settings.tenant)
    if status_ is not None:
        query = query.where(Job.status == status_)
    if error_code is not None:
        query = query.where(Job.last_error_code == error_code)
    if batch is not None:
        query = query.where(Job.batch == batch)
    if tag is not None:
        query = query.where(Job.tag == tag)
    query = query.order_by(Job.created_at.desc(), Job.id).limit(limit)
    with database(settings) as factory, factory() as session:
        rows = session.scalars(query).all()
        views = [job_view(session, job) for job in rows]
    if json_out:
        for view in views:
            _emit(view)
        return
    # The full id, never ellipsised: it is what the user copies into `status`.
    job_column = Column("job", no_wrap=True, min_width=36)
    table = Table(job_column, "status", "api calls", "error", "tag", "batch", "created")
    for view in views:
        table.add_row(
            view["job_id"],
            view["status"],
            str(view["attempts"]),
            view["error_code"] or "",
            view["tag"] or "",
            view["batch"] or "",
            (view["created_at"] or "")[:19].replace("T", " "),
        )
    Console().print(table)
    typer.echo(f"{len(views)} job(s)", err=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(submit)
    app.command()(status)
    app.command()(jobs)
