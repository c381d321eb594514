"""Engine and session factories built from settings (SQLite gets WAL and a busy timeout).

The tenant wall's application side lives here: `make_tenant_sessionmaker` gives sessions
whose every transaction, on PostgreSQL, starts as the `macao_ocr_tenant` role with the
tenant set, so the row-level security policies (migrations/rls.py) hide other tenants' rows
whatever a query says. Sessions from `make_sessionmaker` act as the login's own role: the
worker, the sweeper and operator commands (`--all-tenants`), whose login must be a member of
`macao_ocr_operator`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from worker.settings import Settings

# Names the migrations' policies use (migrations/rls.py): a public contract with the schema.
TENANT_ROLE = "macao_ocr_tenant"
OPERATOR_ROLE = "macao_ocr_operator"
TENANT_SETTING = "macao_ocr.tenant"
# Owner read/write only: the file holds every card, name and ID number.
SQLITE_FILE_MODE = 0o600


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """One engine per process; pool sized for a threads pool worker."""
    url = settings.database_url
    # Bound parameters (names, ID numbers) would otherwise be quoted in exception text.
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        create_sqlite_file(url)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def create_sqlite_file(url: str) -> None:
    """Create a SQLite database file 0600 before SQLite does (it would use 0644 less umask).

    An existing file is left as it is: its mode is its owner's choice."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, SQLITE_FILE_MODE)
    except OSError:
        # Lost a race to another process, or a missing directory: SQLite says what is wrong.
        return
    os.close(fd)
    # O_CREAT's mode passes through the umask, which may only remove bits: 0600 or less.


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions as the login's own role: every tenant (the worker, sweeper, operators)."""
    return sessionmaker(engine, expire_on_commit=False)


# One round trip for both: `set_config('role', ..., true)` is `SET LOCAL ROLE` (the same
# membership check), and it runs at the start of every tenant transaction.
_ENTER_TENANT = text(
    f"SELECT set_config('role', '{TENANT_ROLE}', true), "
    f"set_config('{TENANT_SETTING}', :tenant, true)"
)


def enter_tenant(connection: Connection, tenant: str) -> None:
    """Make the connection's current transaction act for `tenant` only (PostgreSQL).

    Both settings are transaction-local: they end with the transaction, so a pooled
    connection never carries one tenant's identity into another's work."""
    if connection.dialect.name != "postgresql":
        return
    connection.execute(_ENTER_TENANT, {"tenant": tenant})


def make_tenant_sessionmaker(engine: Engine, tenant: str) -> sessionmaker[Session]:
    """Sessions that see and write only `tenant`'s rows, enforced by PostgreSQL itself.

    On SQLite (no roles, no row-level security) these are plain sessions: there the
    queries' own tenant filters are the only wall."""
    if not tenant:
        raise ValueError("a tenant session needs a tenant")
    factory = sessionmaker(engine, expire_on_commit=False)
    if engine.dialect.name == "postgresql":

        @event.listens_for(factory, "after_begin")
        def _wall(_session: Session, _trans: SessionTransaction, connection: Connection) -> None:
            enter_tenant(connection, tenant)

    return factory


def make_autocommit_engine(settings: Settings, **kwargs: Any) -> Engine | None:
    """On PostgreSQL, an engine whose connections run each statement on its own, for units
    of work that are ONE statement there (a plain job start, a job's success): a statement
    is atomic by itself, and BEGIN and COMMIT would cost two more round trips each time. A
    pool of its own, because switching a pooled connection to autocommit and back eats half
    the gain (CPU per statement measured here: 250 us in a transaction, 195 switching, 137
    on its own pool). None elsewhere: SQLite's versions of those units take several
    statements."""
    if make_url(settings.database_url).get_backend_name() != "postgresql":
        return None
    return make_engine(settings, isolation_level="AUTOCOMMIT", **kwargs)


class TenantSessions:
    """`make_tenant_sessionmaker` per tenant, made once and kept, for a process serving many
    tenants over one engine (the HTTP API: every request's work as its caller's tenant)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._factories: dict[str, sessionmaker[Session]] = {}
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> sessionmaker[Session]:
        """The session factory acting for `tenant` only."""
        found = self._factories.get(tenant)
        if found is None:
            with self._lock:
                found = self._factories.get(tenant)
                if found is None:
                    found = self._factories[tenant] = make_tenant_sessionmaker(self.engine, tenant)
        return found
