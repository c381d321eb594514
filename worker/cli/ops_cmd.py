"""`macao-ocr flower` (Flower, authentication required) and `macao-ocr stats`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import ALL_TENANTS_HELP, database, fail, load_or_exit, scope
from worker.errors import ConfigError
from worker.settings import Settings, env_name
from worker.store.stats import DEFAULT_WINDOW_MIN, Stats

# Flower's own variables: when the user set one, it wins over ours.
FLOWER_AUTH_VARS = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")
# Flower reads the broker and nothing else: it never gets the API secret or the data keys,
# nor the database's URL (with its password): it never opens the database.
# (The SecretId alone signs nothing; it stays, so the app Flower loads builds as the worker's.)
FLOWER_WITHHELD_VARS = frozenset(
    {
        "MACAO_OCR_DATABASE_URL",
        "TENCENTCLOUD_SECRET_KEY",
        "TENCENTCLOUD_SESSION_TOKEN",
        "MACAO_OCR_SECRET_KEY",
        "MACAO_OCR_SESSION_TOKEN",
        "MACAO_OCR_LOOKUP_KEY",
    }
)
FLOWER_WITHHELD_PREFIXES = ("MACAO_OCR_DATA_KEYS",)
DEFAULT_FLOWER_ADDRESS = "127.0.0.1"


def flower_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the secrets Flower has no use for."""
    return {
        name: value
        for name, value in env.items()
        if name.upper() not in FLOWER_WITHHELD_VARS
        and not name.upper().startswith(FLOWER_WITHHELD_PREFIXES)
    }


def flower_command(
    settings: Settings,
    env: Mapping[str, str],
    *,
    port: int | None = None,
    address: str | None = None,
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run Flower with authentication on.

    Credentials travel in FLOWER_BASIC_AUTH (Flower reads it), not on the command line where
    `ps` would show the password to every user of the host. A FLOWER_BASIC_AUTH or FLOWER_AUTH
    (OAuth) the user set is kept as is; so are FLOWER_PORT / FLOWER_ADDRESS unless --port /
    --address are given. Flower listens on 127.0.0.1 unless told otherwise, and its
    environment lacks the API secret, the data keys, the lookup key and the database's URL
    (`flower_env`).
    Raises ConfigError when no authentication is configured.
    """
    child_env = flower_env(env)
    if not any(child_env.get(name) for name in FLOWER_AUTH_VARS):
        password = settings.flower_password.get_secret_value() if settings.flower_password else ""
        if not password:
            raise ConfigError(
                f"Flower needs a password: set {env_name('flower_password')} "
                f"(user {env_name('flower_user')}, default 'admin'), "
                "or Flower's own FLOWER_BASIC_AUTH"
            )
        user = settings.flower_user
        # Flower splits the option on commas; the user part ends at the first colon.
        if "," in password or "," in user or ":" in user or not user:
            raise ConfigError(
                f"{env_name('flower_user')} must be non-empty without ':' or ',', and "
                f"{env_name('flower_password')} must not contain ','"
            )
        child_env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    argv = [sys.executable, "-m", "celery", "-A", "worker", "flower"]
    if port is not None:
        argv.append(f"--port={port}")
    elif not child_env.get("FLOWER_PORT"):
        argv.append(f"--port={settings.flower_port}")
    if address is not None:
        argv.append(f"--address={address}")
    elif not child_env.get("FLOWER_ADDRESS"):
        argv.append(f"--address={DEFAULT_FLOWER_ADDRESS}")
    argv.extend(extra or [])
    return argv, child_env


def flower(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option(help="Port (default MACAO_OCR_FLOWER_PORT, 5555).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Address to bind (default: 127.0.0.1, this host only).")
    ] = None,
) -> None:
    """Run Flower on the broker, basic authentication required (MACAO_OCR_FLOWER_PASSWORD).

    Arguments after `--` go to Flower unchanged (e.g. `-- --url_prefix=flower`).
    """
    settings = load_or_exit()
    try:
        argv, env = flower_command(
            settings, os.environ, port=port, address=address, extra=list(ctx.args)
        )
    except ConfigError as exc:
        raise fail(exc.message) from None
    # Replace this process: Flower gets our signals and exit status directly.
    os.execve(argv[0], argv, env)  # noqa: S606  (argv is ours, no shell involved)


# -- stats


def _fmt(value: float | None, unit: str = "") -> str:
    return "unknown" if value is None else f"{value:,.1f}{unit}"


def render(stats: Stats, console: Console) -> None:
    """The human view of `stats`: a few small tables."""
    whose = "every tenant" if stats.tenant is None else f"tenant {stats.tenant}"
    jobs = Table(title=f"Jobs ({whose})", title_justify="left")
    jobs.add_column("status")
    jobs.add_column("jobs", justify="right")
    for status, n in stats.jobs_by_status.items():
        jobs.add_row(status, f"{n:,}")
    console.print(jobs)

    system = Table(title="System", title_justify="left", show_header=False)
    system.add_column("what")
    system.add_column("value", justify="right")
    system.add_row("dead letters (failed)", f"{stats.dead_letters:,}")
    system.add_row(
        "queue depth", "unknown" if stats.queue_depth is None else f"{stats.queue_depth:,}"
    )
    system.add_row("effective rate / quota", f"{_fmt(stats.effective_rate)} / {stats.quota:g} /s")
    if stats.circuit is None:
        circuit = "unknown"
    elif stats.circuit.open:
        since = stats.circuit.since.isoformat() if stats.circuit.since else "?"
        circuit = f"[bold red]OPEN[/] {stats.circuit.code}: {stats.circuit.message} (since {since})"
    else:
        circuit = "closed"
    system.add_row("account circuit", circuit)
    system.add_row(
        "latency p50 / p99", f"{_fmt(stats.latency_p50_ms)} / {_fmt(stats.latency_p99_ms)} ms"
    )
    console.print(system)

    calls = Table(
        title=f"API calls, last {stats.window_min} min ({stats.calls_in_window:,})",
        title_justify="left",
        min_width=40,
    )
    calls.add_column("outcome")
    calls.add_column("calls", justify="right")
    for code, n in stats.calls_by_outcome.items():
        calls.add_row(code, f"{n:,}")
    console.print(calls)
    for problem in stats.problems:
        console.print(f"[yellow]warning:[/] {problem}", markup=True, highlight=False)


def stats(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    window: Annotated[
        int, typer.Option(min=1, help="Minutes of API calls to summarise.")
    ] = DEFAULT_WINDOW_MIN,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help=ALL_TENANTS_HELP)] = False,
) -> None:
    """Jobs by status, dead letters, queue depth, rate vs quota, circuit, recent calls.

    Jobs and calls are MACAO_OCR_TENANT's unless --all-tenants; the queue, rate and circuit
    are the shared account's."""
    from worker.store.stats import gather

    settings = load_or_exit()
    tenant = scope(settings, all_tenants)
    with database(settings, tenant=tenant) as session_factory, session_factory() as session:
        snapshot = gather(settings, session, window_min=window, tenant=tenant)
    if as_json:
        typer.echo(json.dumps(snapshot.to_json(), ensure_ascii=False))
    else:
        render(snapshot, Console())


def register(app: typer.Typer) -> None:
    """Add `flower` and `stats` to the CLI."""
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(flower)
    app.command()(stats)
