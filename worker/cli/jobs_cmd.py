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
from sqlalchemy import String, select
from sqlalchemy import cast as sa_cast
from sqlalchemy.orm import Session, sessionmaker

from models import Job, JobStatus
from worker.broker.publish import Publisher
from worker.cli.common import (
    ALL_TENANTS_HELP,
    CliError,
    database,
    fail,
    load_or_exit,
    make_publisher,
    os_actor,
    scope,
    sealer_for,
)
from worker.errors import InputError, StateUnavailable
from worker.privacy.seal import Sealer
from worker.producer import MAX_ROWS, JobSpec, ManifestError, read_manifest, submit_many
from worker.producer import submit as submit_one
from worker.reason_codes import Outcome, is_reason_code
from worker.settings import Settings
from worker.store import access
from worker.store.filters import JobFilter
from worker.store.lookup import LOOKUP_OFF, job_ids_by_id_number
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


def _input_failure(exc: InputError, json_out: bool) -> Exception:
    """What to raise for refused input: the boundary's JSON object under --json, else the
    problems printed here (a manifest's, one a line) and exit 2."""
    if json_out:
        details: dict[str, Any] = {}
        if isinstance(exc, ManifestError):
            details["problems"] = [{"line": p.line, "message": p.message} for p in exc.problems]
        return CliError(exc.message, code=exc.code, exit_code=2, details=details)
    _print_input_error(exc)
    return typer.Exit(2)


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
    sealer = sealer_for(settings)
    if base_dir is not None and not base_dir.is_dir():
        raise fail(f"--base-dir is not a folder: {base_dir}")
    try:
        specs = _specs(front, back, manifest, portrait, tag, max_rows)
    except InputError as exc:
        raise _input_failure(exc, json_out) from None
    publisher, app = make_publisher(settings)
    try:
        with database(settings, tenant=settings.tenant) as factory:
            try:
                ids = _submit(
                    factory,
                    publisher,
                    settings,
                    sealer,
                    specs,
                    batch,
                    manifest=manifest is not None,
                    max_rows=max_rows,
                    base_dir=base_dir,
                )
            except InputError as exc:
                raise _input_failure(exc, json_out) from None
            enqueued_at = _enqueued_at(factory, ids)
    finally:
        app.close()
    unpublished = 0
    for spec, job_id in zip(specs, ids, strict=True):
        enqueued = enqueued_at.get(job_id) is not None
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


def _enqueued_at(factory: sessionmaker[Session], ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """Whether each job's message went out: two columns, a bounded IN list at a time."""
    found: dict[uuid.UUID, Any] = {}
    with factory() as session:
        for start in range(0, len(ids), 1_000):
            chunk = ids[start : start + 1_000]
            rows = session.execute(select(Job.id, Job.enqueued_at).where(Job.id.in_(chunk)))
            found.update({row.id: row.enqueued_at for row in rows})
    return found


def _submit(
    factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    sealer: Sealer,
    specs: Sequence[JobSpec],
    batch: str | None,
    *,
    manifest: bool,
    max_rows: int = MAX_ROWS,
    base_dir: Path | None = None,
) -> list[uuid.UUID]:
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
                sealer=sealer,
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
            sealer=sealer,
        )


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


SHORT_ID_LEN = 8
_HEX = frozenset("0123456789abcdef")


def short_id(job_id: str) -> str:
    """The first 8 characters of a job id: what `jobs` prints, what `status` accepts."""
    return job_id[:SHORT_ID_LEN]


def _parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _find_job(session: Session, text: str, tenant: str | None) -> Job | None:
    """A job by its full id, or by a unique prefix of 6-8 hex characters (a short id); of
    `tenant` only (None: any tenant, an operator's look)."""
    # The tenant condition is kept beside the database's wall: SQLite has none.
    mine = [] if tenant is None else [Job.tenant == tenant]
    job_id = _parse_id(text)
    if job_id is not None:
        return session.scalars(select(Job).where(Job.id == job_id, *mine)).first()
    prefix = text.lower()
    if not 6 <= len(prefix) <= SHORT_ID_LEN or not set(prefix) <= _HEX:
        return None
    # The first 8 characters print the same with or without the dashes (PostgreSQL's uuid
    # text, SQLite's 32-character hex).
    matches = session.scalars(
        select(Job).where(*mine, sa_cast(Job.id, String).like(f"{prefix}%")).limit(2)
    ).all()
    if len(matches) > 1:
        raise fail(f"{text} matches several jobs: give the full id (`jobs --full-ids`)")
    return matches[0] if matches else None


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
        table.add_row("decision", view["decision"] or "not decided (run `macao-ocr decide`)")
        for reason in view["reasons"]:
            table.add_row("reason", f"{reason['code']} ({reason['source']}): {reason['detail']}")
    console = Console()
    console.print(table)
    if "history" in view:
        console.print(history_table(view["history"]))
    typer.echo("")


def history_table(items: list[dict[str, Any]]) -> Table:
    """`status --history` for a person: one row per API call or event, oldest first."""
    table = Table(
        Column("at", no_wrap=True),
        Column("what", no_wrap=True),
        Column("outcome"),
        Column("detail", overflow="fold"),
        title="history",
        title_justify="left",
    )
    for item in items:
        at = (item["at"] or "")[:19].replace("T", " ")
        if item["type"] == "attempt":
            latency = item.get("latency_ms")
            detail = " ".join(
                part
                for part in (
                    item.get("message") or "",
                    f"{latency:.0f} ms" if latency is not None else "",
                    f"RequestId {item['request_id']}" if item.get("request_id") else "",
                )
                if part
            )
            table.add_row(at, f"call {item['number']}", item.get("outcome_code") or "", detail)
        else:
            was = item.get("previous_status")
            if was and item.get("previous_error_code"):
                was = f"{was}, {item['previous_error_code']}"
            detail = " ".join(
                part
                for part in (
                    f"by {item['actor']}" if item.get("actor") else "",
                    item.get("reason") or "",
                    f"(was {was})" if was else "",
                )
                if part
            )
            table.add_row(at, str(item["kind"]), "", detail)
    if not items:
        table.add_row("", "no API call or event yet", "", "")
    return table


def status(
    job_ids: Annotated[list[str], typer.Argument(help="One or more job ids.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    history: Annotated[bool, typer.Option(help="Every API call and event.")] = False,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help=ALL_TENANTS_HELP)] = False,
) -> None:
    """Show jobs: status, API calls, last error, result and warnings. Exit 1 if one is unknown.

    A job is named by its id or by the short id `jobs` prints (its first 8 characters).
    """
    settings = load_or_exit()
    sealer = sealer_for(settings)
    tenant = scope(settings, all_tenants)
    pause, pause_known = read_pause(settings)
    missing = 0
    views: list[dict[str, Any]] = []
    with database(settings, tenant=tenant) as factory:
        shown: list[Job] = []
        with factory() as session:
            for text in job_ids:
                job = _find_job(session, text, tenant)
                if job is None:
                    missing += 1
                    views.append(not_found_view(text))
                else:
                    shown.append(job)
                    view = job_view(session, job, sealer=sealer, history=history)
                    views.append(_with_tenant(view, job, tenant))
            personal = access.with_personal_fields(session, [job.id for job in shown])
        # Logged before anything is shown: a read that cannot be logged shows nothing.
        _log_reads(factory, access.CLI_STATUS, [j for j in shown if j.id in personal])
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


def _log_reads(factory: sessionmaker[Session], how: str, shown: Sequence[Job]) -> None:
    """One access_log row per job whose personal fields are about to be shown."""
    reads = [access.Read(tenant=job.tenant, job_id=job.id) for job in shown]
    access.record(factory, actor=os_actor(), how=how, reads=reads)


# -- jobs


def _with_tenant(view: dict[str, Any], job: Job, tenant: str | None) -> dict[str, Any]:
    """Across tenants (`--all-tenants`), each job says whose it is."""
    if tenant is None:
        view["tenant"] = job.tenant
    return view


def jobs(
    status_: Annotated[
        JobStatus | None, typer.Option("--status", help="Only jobs in this status.")
    ] = None,
    error_code: Annotated[
        str | None, typer.Option(help="Only jobs whose last error is this.")
    ] = None,
    batch: Annotated[str | None, typer.Option(help="Only this batch.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only this tag.")] = None,
    decision: Annotated[
        Outcome | None, typer.Option(help="Only succeeded jobs with this decision.")
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option(help="Only jobs whose decision has this reason code (e.g. photocopy)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (newest first).")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    full_ids: Annotated[
        bool, typer.Option("--full-ids", help="Whole job ids (default: the first 8 characters).")
    ] = False,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help=ALL_TENANTS_HELP)] = False,
    id_number: Annotated[
        str | None,
        typer.Option(
            "--id-number",
            help="Only the jobs of this card number (keyed hash; needs MACAO_OCR_LOOKUP_KEY).",
        ),
    ] = None,
) -> None:
    """List this tenant's jobs (MACAO_OCR_TENANT), newest first (times in UTC)."""
    if reason is not None and not is_reason_code(reason):
        raise fail(f"--reason: unknown code {reason[:48]!r} (see README, Decisions)")
    settings = load_or_exit()
    sealer = sealer_for(settings)
    tenant = scope(settings, all_tenants)
    person: list[uuid.UUID] | None = None
    if id_number is not None:
        if sealer.lookup_key is None:
            raise fail(f"--id-number: {LOOKUP_OFF}", error="lookup_disabled")
        with database(settings, tenant=tenant) as factory, factory() as session:
            person = job_ids_by_id_number(session, sealer.lookup_keys, id_number, tenant)
    matching = JobFilter(
        tenant=tenant,
        job_ids=person,
        status=status_,
        error_code=error_code,
        batch=batch,
        tag=tag,
        decision=None if decision is None else decision.value,
        reason=reason,
    )
    query = matching.select().order_by(Job.created_at.desc(), Job.id).limit(limit)
    with database(settings, tenant=tenant) as factory:
        with factory() as session:
            rows = session.scalars(query).all()
            views = [
                _with_tenant(job_view(session, job, sealer=sealer), job, tenant) for job in rows
            ]
            personal = access.with_personal_fields(session, [job.id for job in rows])
        if json_out:
            # The table shows no personal field; the JSON lines do.
            _log_reads(factory, access.CLI_JOBS, [j for j in rows if j.id in personal])
    if json_out:
        for view in views:
            _emit(view)
        return
    # The id is never ellipsised: it is what the user copies into `status` (which takes the
    # short id too). Short ids keep the table inside an 80-column terminal; the widths are
    # set here because Rich's own shrinking squeezed the error column to nothing.
    console = Console()
    id_width = 36 if full_ids else SHORT_ID_LEN
    tenant_width = (
        0 if tenant is not None else max([len("tenant"), *(len(v["tenant"]) for v in views)])
    )
    fixed = (
        tenant_width
        + id_width
        + len("succeeded")
        + len("consider")
        + len("calls")
        + len("2026-01-02 03:04")
    )
    gaps = 2 * (7 if tenant is not None else 8)  # no box: one space each side between columns
    rest = max(console.width - fixed - gaps, 18)
    error_width = max(rest // 2, 10)
    tag_width = max((rest - error_width) // 2, 3)
    table = Table(
        Column("job", no_wrap=True, width=id_width),
        *([Column("tenant", no_wrap=True, width=tenant_width)] if tenant is None else []),
        Column("status", no_wrap=True, width=len("succeeded")),
        Column("decision", no_wrap=True, width=len("consider")),
        Column("calls", justify="right", no_wrap=True, width=len("calls")),
        # The whole error code (or a succeeded job's reason codes), folded over lines if need
        # be (it is what --error-code / --reason take); long tags and batches are cut (…).
        Column("error / reasons", overflow="fold", width=error_width),
        Column("tag", overflow="ellipsis", no_wrap=True, width=tag_width),
        Column("batch", overflow="ellipsis", no_wrap=True, width=rest - error_width - tag_width),
        Column("created", no_wrap=True, width=len("2026-01-02 03:04")),
        box=None,
        pad_edge=False,
    )
    for view in views:
        table.add_row(
            view["job_id"] if full_ids else short_id(view["job_id"]),
            *([view["tenant"]] if tenant is None else []),
            view["status"],
            view["decision"] or "",
            str(view["attempts"]),
            view["error_code"] or ", ".join(r["code"] for r in view["reasons"]),
            view["tag"] or "",
            view["batch"] or "",
            (view["created_at"] or "")[:16].replace("T", " "),
        )
    # Never narrower than the columns: Rich would cut the ids (--full-ids on a narrow screen).
    needed = fixed + gaps + rest
    if needed > console.width:
        console = Console(width=needed)
    console.print(table)
    typer.echo(f"{len(views)} job(s)", err=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(submit)
    app.command()(status)
    app.command()(jobs)
