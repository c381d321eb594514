"""`macao-ocr replay` (dead letters go round again) and `macao-ocr sweep` (operators' sweeper)."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.common import (
    ALL_TENANTS_HELP,
    database,
    fail,
    load_or_exit,
    make_publisher,
    os_actor,
    scope,
    sealer_for,
)
from worker.errors import InputError
from worker.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from worker.broker.publish import Publisher


def default_actor() -> str:
    """$USER@host, recorded in the replay event."""
    return os_actor()


class _NoPublish:
    """A dry run publishes nothing (and needs no broker)."""

    def publish(self, job_ids: Sequence[uuid.UUID]) -> None:
        raise AssertionError("a dry run must not publish")


def _job_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise fail(f"JOB_ID must be a job id (a UUID); got {text[:40]!r}") from None


def _when(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"{name} must be an ISO 8601 time, e.g. 2030-01-02T03:04:05Z") from None
    if value.tzinfo is None:
        raise fail(f"{name} needs a time zone, e.g. 2030-01-02T03:04:05Z or +08:00")
    return value


def replay_command(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Job ids to replay.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only jobs in this status (default with filters: failed).")
    ] = None,
    error_code: Annotated[
        str | None, typer.Option(help="Only jobs whose last error is this code.")
    ] = None,
    batch: Annotated[str | None, typer.Option(help="Only jobs of this batch.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only jobs that finished at or after this ISO time.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Only jobs that finished before this ISO time.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the job's history).")] = None,
    actor: Annotated[str | None, typer.Option(help="Who (default: $USER@host).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also replay succeeded jobs (their result is deleted).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Show what would be replayed; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help=ALL_TENANTS_HELP)] = False,
) -> None:
    """Queue failed jobs again (fresh failure budget, history kept), by id or by filter."""
    from worker.replay import replay

    ids = [_job_id(t) for t in job_ids] if job_ids else None
    since_at, until_at = _when("--since", since), _when("--until", until)
    if not ids and all(v is None for v in (status, error_code, batch, since, until)):
        raise fail(
            "name JOB_IDs or a filter (--status, --error-code, --batch, --since, --until); "
            "replaying everything is never implied"
        )
    settings = load_or_exit()
    sealer = sealer_for(settings)
    publisher: Publisher = _NoPublish() if dry_run else make_publisher(settings)[0]
    try:
        with database(settings, tenant=scope(settings, all_tenants)) as session_factory:
            report = replay(
                session_factory,
                publisher,
                settings,
                job_ids=ids,
                status=status,
                error_code=error_code,
                batch=batch,
                since=since_at,
                until=until_at,
                actor=actor or default_actor(),
                reason=reason,
                force=force,
                dry_run=dry_run,
                all_tenants=all_tenants,
                sealer=sealer,
            )
    except InputError as exc:
        raise fail(exc.message) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        verb = "would replay" if dry_run else "replayed"
        typer.echo(f"{len(report.matched)} matched, {verb} {len(report.replayed)}")
        if report.stored:
            stored = "would store" if dry_run else "stored"
            typer.echo(f"{stored} {len(report.stored)} from their kept answer (no new call)")
        if dry_run:
            for job_id in report.replayed:
                typer.echo(f"  {job_id}  {report.error_codes.get(job_id) or '-'}")
        for job_id, why in report.refused.items():
            code = report.refused_codes.get(job_id)
            typer.echo(f"refused {job_id}: {why}" + (f" ({code})" if code else ""), err=True)
        if not report.published:
            typer.echo(
                "broker unavailable: the jobs are queued; the sweeper publishes them", err=True
            )
    if report.refused:
        raise typer.Exit(1)


def sweep_command(
    once: Annotated[bool, typer.Option("--once", help="Sweep once and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print the report.")] = False,
) -> None:
    """Publish due retries, never-published and lost jobs; take back dead workers' jobs."""
    # Sweeping on (a service) logs as configured; --once is a person's command.
    settings = load_or_exit(interactive=once)
    with database(settings) as session_factory:
        _sweep(settings, session_factory, once=once, as_json=as_json)


def _sweep(
    settings: Settings, session_factory: sessionmaker[Session], *, once: bool, as_json: bool
) -> None:
    from worker.broker.publish import WEBHOOK_QUEUE, WEBHOOK_TASK_NAME, CeleryPublisher
    from worker.sweeper import broker_client, run_sweeper, sweep_once

    publisher, app = make_publisher(settings)
    webhooks = CeleryPublisher(app, task=WEBHOOK_TASK_NAME, queue=WEBHOOK_QUEUE)
    client = broker_client(settings)
    if once:
        # An operator's explicit sweep runs even while a worker leads: the rules are idempotent.
        report = sweep_once(
            session_factory, publisher, settings, redis=client, webhook_publisher=webhooks
        )
        counts = {
            "due_retries": len(report.due_retries),
            "never_published": len(report.never_published),
            "lost": len(report.lost),
            "recovered": len(report.recovered),
            "failed": len(report.failed),
            "webhook_deliveries": len(report.deliveries),
            "broker_restarted": report.broker_restarted,
            "publish_failed": report.publish_failed,
            "retention": report.retention.to_dict(),
        }
        if as_json:
            typer.echo(json.dumps(counts))
        else:
            plain = {k: v for k, v in counts.items() if k != "retention"}
            removed = report.retention.to_dict()
            plain.update({f"retention.{k}": v for k, v in removed.items()})
            typer.echo(", ".join(f"{k} {v}" for k, v in plain.items()))
        if report.publish_failed:
            raise typer.Exit(1)
        return
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_sweeper(
        settings, session_factory, publisher, stop, client=client, webhook_publisher=webhooks
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command("replay")(replay_command)
    app.command("sweep")(sweep_command)
