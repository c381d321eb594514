"""`macao-ocr purge | erase | audit`: retention now, erasure on request, the access log.

Thin faces on worker.store.retention, worker.store.erasure and worker.store.access. They
print counts and job ids, never a value of a card.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.common import (
    ALL_TENANTS_HELP,
    EXIT_RUNTIME,
    database,
    fail,
    load_or_exit,
    os_actor,
    scope,
)
from worker.errors import InputError
from worker.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker


def _emit(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


def _counts(removed: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in removed.items())


def purge_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what is due; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Apply retention now, to every tenant: print what was removed (counts, never values)."""
    from worker.store.retention import purge

    settings = load_or_exit()
    # Retention is the deployment's, not a tenant's: an operator's session.
    with database(settings) as session_factory:
        report = purge(session_factory, settings, dry_run=dry_run)
    if as_json:
        _emit(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb}: {_counts(report.removed.to_dict())}")


def _job_ids(texts: list[str]) -> list[uuid.UUID]:
    ids = []
    for text in texts:
        try:
            ids.append(uuid.UUID(text))
        except ValueError:
            raise fail(f"--job must be a job id (a UUID); got {text[:40]!r}") from None
    return ids


def by_id_number(
    session_factory: sessionmaker[Session], settings: Settings, id_number: str, tenant: str | None
) -> list[uuid.UUID]:
    """The jobs whose result holds this ID number, through the keyed-hash lookup
    (worker.store.lookup): nothing is decrypted to find them."""
    from worker.store.lookup import LOOKUP_OFF, job_ids_by_id_number

    lookup_keys = settings.lookup_keys_bytes()
    if not lookup_keys:
        raise fail(f"--id-number: {LOOKUP_OFF}", error="lookup_disabled")
    with session_factory() as session:
        return job_ids_by_id_number(session, lookup_keys, id_number, tenant)


def erase_command(
    more: Annotated[
        list[str] | None,
        typer.Argument(help="More job ids, after --job (`--job ID ID ID`).", show_default=False),
    ] = None,
    job: Annotated[
        list[str] | None, typer.Option("--job", help="A job id to erase (repeatable).")
    ] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Erase every job of this tag.")] = None,
    id_number: Annotated[
        str | None,
        typer.Option("--id-number", help="Erase every job of this ID number (needs lookup)."),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in each job's history).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be removed; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help=ALL_TENANTS_HELP)] = False,
) -> None:
    """Remove every piece of personal data of some jobs, in one transaction, for good."""
    from worker.store.erasure import erase

    if more and not job:
        raise fail("job ids go after --job (`erase --job ID [ID...]`)")
    job = [*(job or ()), *(more or ())]
    chosen = [name for name, v in (("--job", job), ("--tag", tag), ("--id-number", id_number)) if v]
    if len(chosen) != 1:
        raise fail("name exactly one of --job, --tag or --id-number; erasing all is never implied")
    settings = load_or_exit()
    if id_number is not None and settings.lookup_key_bytes() is None:
        from worker.store.lookup import LOOKUP_OFF

        # Before any database work.
        raise fail(f"--id-number: {LOOKUP_OFF}", error="lookup_disabled")
    tenant = scope(settings, all_tenants)
    with database(settings, tenant=tenant) as session_factory:
        ids = _job_ids(job) if job else None
        if id_number is not None:
            ids = by_id_number(session_factory, settings, id_number, tenant)
            if not ids:
                raise fail("no job of this tenant holds that ID number", EXIT_RUNTIME)
        try:
            report = erase(
                session_factory,
                tenant=tenant,
                job_ids=ids,
                tag=tag,
                actor=os_actor(),
                reason=reason,
                dry_run=dry_run,
            )
        except InputError as exc:
            raise fail(exc.message) from None
    if as_json:
        _emit(report.to_dict())
    else:
        verb = "would erase" if dry_run else "erased"
        typer.echo(f"{len(report.matched)} matched, {verb} {len(report.erased)}")
        removed = _counts(report.removed.to_dict())
        typer.echo(f"{'would remove' if dry_run else 'removed'}: {removed}")
        if report.stopped:
            stopped = len(report.stopped)
            typer.echo(f"{stopped} queued or retrying job(s) end failed (Internal.Erased)")
        for job_id, why in report.refused.items():
            typer.echo(f"refused {job_id}: {why}", err=True)
    if report.refused or not report.matched:
        raise typer.Exit(1)


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise fail("--since must be an ISO 8601 time, e.g. 2030-01-02T03:04:05Z") from None
    if value.tzinfo is None:
        raise fail("--since needs a time zone, e.g. 2030-01-02T03:04:05Z or +08:00")
    return value


def audit_command(
    job: Annotated[str | None, typer.Option("--job", help="Only reads of this job.")] = None,
    since: Annotated[str | None, typer.Option(help="Only reads at or after this ISO time.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (newest first).")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help=ALL_TENANTS_HELP)] = False,
) -> None:
    """List the access log: who was shown a result's personal fields, which job, when, how."""
    from worker.store import access

    job_id = _job_ids([job])[0] if job else None
    since_at = _since(since)
    settings = load_or_exit()
    tenant = scope(settings, all_tenants)
    with database(settings, tenant=tenant) as factory, factory() as session:
        rows = access.entries(session, tenant=tenant, job_id=job_id, since=since_at, limit=limit)
    if as_json:
        for row in rows:
            _emit(row)
        return
    for row in rows:
        typer.echo(
            f"{row['at'][:19].replace('T', ' ')}  {row['how']:<12}  {row['job_id'] or '-':<36}  "
            f"{row['actor']}" + (f"  ({row['tenant']})" if tenant is None else "")
        )
    typer.echo(f"{len(rows)} read(s)", err=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command("purge")(purge_command)
    app.command("erase")(erase_command)
    app.command("audit")(audit_command)
