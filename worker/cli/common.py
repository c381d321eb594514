"""What every command needs: settings or a clean exit, a database, a publisher."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.broker.publish import CeleryPublisher, Publisher
from worker.errors import ConfigError
from worker.settings import Settings, load_settings


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr; raise the returned Exit (2: usage/input, 1: runtime)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load_or_exit() -> Settings:
    """Settings for this command, with logging configured; a bad variable exits naming it."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise fail(exc.message) from None
    from worker.logs import configure_logging

    configure_logging(settings)
    return settings


@contextmanager
def database(settings: Settings, *, tenant: str | None = None) -> Iterator[sessionmaker[Session]]:
    """A session factory for the command's lifetime; database errors exit with their reason.

    With `tenant`, its sessions act for that tenant only (behind PostgreSQL's row-level
    security); without, as the login's own role (every tenant: operator commands)."""
    from worker.store.engine import make_engine, make_sessionmaker, make_tenant_sessionmaker

    engine = make_engine(settings)
    try:
        if tenant is None:
            yield make_sessionmaker(engine)
        else:
            yield make_tenant_sessionmaker(engine, tenant)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or type(exc).__name__).strip()
        raise fail(f"database error: {reason}", 1) from None
    finally:
        engine.dispose()


ALL_TENANTS_HELP = "Every tenant's jobs (operators; needs the macao_ocr_operator role)."


def scope(settings: Settings, all_tenants: bool) -> str | None:
    """The tenant a command acts for: MACAO_OCR_TENANT, or None (every tenant) on request."""
    return None if all_tenants else settings.tenant


def make_publisher(settings: Settings) -> tuple[Publisher, Any]:
    """The Celery publisher and the app to close afterwards (imported late: an entry point)."""
    from worker.app import create_app

    app = create_app(settings)
    return CeleryPublisher(app), app
