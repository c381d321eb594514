"""What every command needs: settings or a clean exit, a database, a publisher, and the one
error boundary that turns an expected failure into one line (or one JSON object) and an exit
status.

Expected failures (bad settings or input, a busy port, a missing file, an unreachable or
unmigrated database, Redis out of reach) print `error: <what> (<what to do>)` on stderr and exit
non-zero; under a command's `--json` they print `{"error": {"code", "message", "exit_code"}}`
on stderr instead (stdout carries results only). The global `--debug` adds the traceback.
"""

from __future__ import annotations

import errno
import json
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from sqlalchemy.orm import Session, sessionmaker
from typer.core import TyperGroup

from worker.broker.publish import CeleryPublisher, Publisher
from worker.errors import ConfigError, DeploymentError, InputError, MacaoOcrError
from worker.settings import Settings, load_settings

if TYPE_CHECKING:
    from worker.privacy.seal import Sealer

EXIT_RUNTIME = 1
EXIT_USAGE = 2
UPGRADE_HINT = "run `macao-ocr db upgrade`"


class CliError(Exception):
    """An expected failure of a command: one line (or JSON object), exit `exit_code`."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "usage",
        exit_code: int = EXIT_USAGE,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
        self.details = details or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body["exit_code"] = self.exit_code
        body.update(self.details)
        return {"error": body}


def fail(message: str, code: int = EXIT_USAGE, *, error: str | None = None) -> CliError:
    """The failure to raise: `raise fail(...)` (exit 2: usage/input, 1: runtime)."""
    default = "usage" if code == EXIT_USAGE else "failed"
    return CliError(message, code=error or default, exit_code=code)


# -- classifying what went wrong


def _db_reason(exc: BaseException) -> str:
    from worker.logs import scrub_text

    text = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()
    return scrub_text(text[0] if text else type(exc).__name__)


def _unmigrated(reason: str) -> bool:
    lowered = reason.lower()
    return ("relation" in lowered and "does not exist" in lowered) or "no such table" in lowered


def _from_database(exc: Exception) -> CliError | None:
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

    if not isinstance(exc, SQLAlchemyError):
        return None
    if isinstance(exc, ArgumentError | NoSuchModuleError):
        return CliError(f"bad database URL: {exc}", code="config")
    reason = _db_reason(exc)
    if _unmigrated(reason):
        return CliError(
            f"the database is not migrated ({reason}): {UPGRADE_HINT}",
            code="database_not_migrated",
            exit_code=EXIT_RUNTIME,
        )
    if isinstance(exc, OperationalError):
        return CliError(
            f"database unreachable: {reason}", code="database_unreachable", exit_code=EXIT_RUNTIME
        )
    return CliError(f"database error: {reason}", code="database_error", exit_code=EXIT_RUNTIME)


def _from_os(exc: OSError) -> CliError:
    if exc.errno == errno.EADDRINUSE:
        return CliError(
            f"port busy: {exc.strerror or exc} (choose another port)",
            code="port_in_use",
            exit_code=EXIT_RUNTIME,
        )
    if exc.filename is not None:
        what = exc.strerror or type(exc).__name__
        return CliError(f"{exc.filename}: {what}", code="file_error", exit_code=EXIT_USAGE)
    return CliError(f"{exc.strerror or exc}", code="os_error", exit_code=EXIT_RUNTIME)


def classify(exc: Exception) -> CliError:
    """The one-line failure a command's exception stands for (unknown ones included)."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, ConfigError):
        return CliError(exc.message, code="config", exit_code=EXIT_USAGE)
    if isinstance(exc, DeploymentError):
        hint = f": {exc.fix}" if exc.fix else ""
        return CliError(f"{exc.message}{hint}", code=exc.code, exit_code=EXIT_RUNTIME)
    if isinstance(exc, InputError):
        return CliError(exc.message, code=exc.code, exit_code=EXIT_USAGE)
    if isinstance(exc, MacaoOcrError):
        return CliError(exc.message, code=exc.code, exit_code=EXIT_RUNTIME)
    database = _from_database(exc)
    if database is not None:
        return database
    import redis

    if isinstance(exc, redis.RedisError):
        return CliError(
            f"Redis unreachable: {_db_reason(exc)}",
            code="redis_unreachable",
            exit_code=EXIT_RUNTIME,
        )
    from worker.broker.publish import BROKER_ERRORS

    if isinstance(exc, BROKER_ERRORS):
        return CliError(
            f"broker unreachable: {_db_reason(exc)}",
            code="broker_unreachable",
            exit_code=EXIT_RUNTIME,
        )
    if isinstance(exc, OSError):
        return _from_os(exc)
    return CliError(
        f"unexpected {type(exc).__name__} (run with --debug for the traceback)",
        code="internal",
        exit_code=EXIT_RUNTIME,
    )


def _flag_before_command(argv: Sequence[str], flag: str) -> bool:
    """`flag` given as a global option (before the command name)."""
    for arg in argv:
        if arg == flag:
            return True
        if not arg.startswith("-"):
            return False
    return False


def _json_requested(argv: Sequence[str]) -> bool:
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def report(exc: Exception, argv: Sequence[str]) -> int:
    """Print `exc` as one line (JSON under --json; the traceback too under --debug)."""
    error = classify(exc)
    if _flag_before_command(argv, "--debug"):
        traceback.print_exception(exc, file=sys.stderr)
    if _json_requested(argv):
        # stderr too: stdout carries results only, so a pipe into a JSON reader never
        # mistakes an error for a result; the exit status says which it is.
        sys.stderr.write(json.dumps(error.to_json(), ensure_ascii=False) + "\n")
    else:
        sys.stderr.write(f"error: {error.message}\n")
    return error.exit_code


class BoundaryGroup(TyperGroup):
    """The root command group: its `main` is the CLI's one error boundary."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(
                args=argv,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=standalone_mode,
                **extra,
            )
        except Exception as exc:
            code = report(exc, argv)
            if standalone_mode:
                sys.exit(code)
            raise typer.Exit(code) from None


# -- what commands share


class CliOptions:
    """Global options (set by the root callback before a command runs)."""

    log_json: bool = False


def load_or_exit(*, interactive: bool = True) -> Settings:
    """Settings for this command, with logging configured; a bad variable exits naming it.

    An interactive command (submit, status, jobs, replay...) logs warnings and errors only,
    as readable console lines: its output is for a person. `--log-json`, or
    MACAO_OCR_LOG_JSON / MACAO_OCR_LOG_LEVEL set in the environment, restore the configured
    logging. Services (`sweep` without `--once`) always log as configured.
    """
    settings = load_settings()
    from worker.logs import configure_logging

    if not interactive:
        configure_logging(settings)
        return settings
    explicit = settings.model_fields_set
    log_json = CliOptions.log_json or ("log_json" in explicit and settings.log_json)
    level = None if "log_level" in explicit else "WARNING"
    configure_logging(settings.model_copy(update={"log_json": log_json}), level=level)
    return settings


def sealer_for(settings: Settings) -> Sealer:
    """The command's sealer (worker.privacy.seal): a command that stores or reads personal
    data stops here, with one line naming the key variables, when none is configured."""
    from worker.privacy.seal import Sealer

    return Sealer.from_settings(settings)


@contextmanager
def database(settings: Settings, *, tenant: str | None = None) -> Iterator[sessionmaker[Session]]:
    """A session factory for the command's lifetime (errors reach the boundary).

    With `tenant`, its sessions act for that tenant only (behind PostgreSQL's row-level
    security); without, as the login's own role (every tenant: operator commands)."""
    from worker.store.engine import make_engine, make_sessionmaker, make_tenant_sessionmaker

    engine = make_engine(settings)
    try:
        if tenant is None:
            yield make_sessionmaker(engine)
        else:
            yield make_tenant_sessionmaker(engine, tenant)
    finally:
        engine.dispose()


def os_actor() -> str:
    """Who runs this command, as history events and the access log record it: user@host."""
    from worker.store.access import process_actor

    return process_actor()


ALL_TENANTS_HELP = "Every tenant's jobs (operators; needs the macao_ocr_operator role)."


def scope(settings: Settings, all_tenants: bool) -> str | None:
    """The tenant a command acts for: MACAO_OCR_TENANT, or None (every tenant) on request."""
    return None if all_tenants else settings.tenant


def make_publisher(settings: Settings) -> tuple[Publisher, Any]:
    """The Celery publisher and the app to close afterwards (imported late: an entry point)."""
    from worker.app import create_app

    app = create_app(settings)
    return CeleryPublisher(app), app
