"""Alembic environment: the URL comes from the Config (tests, `macao-ocr db`) or from Settings."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Literal

from alembic import context
from sqlalchemy import Connection, create_engine, pool

import models
from models.base import UTCDateTime

config = context.config
target_metadata = models.Base.metadata

# Only the `alembic` command line brings an ini with logging sections; programmatic callers
# (the CLI, tests) keep the logging they already configured.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    # env.py is an entry point: reading the environment here is allowed.
    from worker.settings import load_settings

    return load_settings().database_url


def render_item(type_: str, obj: object, autogen_context: object) -> str | Literal[False]:
    """Render the model's UTCDateTime as the plain column type it stores."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    url = database_url()
    if url.startswith("sqlite"):
        from worker.store.engine import create_sqlite_file

        # `db upgrade` is often what creates the file: 0600 from the start.
        create_sqlite_file(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run_on(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
