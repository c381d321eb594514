"""The tenant wall on a real PostgreSQL: row-level security, not the application's WHERE
clauses, keeps each tenant to its own rows.

The tests connect as the superuser `postgres`, which bypasses row-level security; they
`SET ROLE` to the tenant or operator role as a production login would be.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from migrations.rls import OPERATOR_POLICY, TENANT_POLICY, enable_tenant_rls
from models import Job
from tests.fixtures.database import PG_PREFIX
from worker.store.engine import (
    OPERATOR_ROLE,
    TENANT_ROLE,
    TENANT_SETTING,
    make_sessionmaker,
    make_tenant_sessionmaker,
)

T0 = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
JOB_TABLES = ("attempt", "job_event", "result", "warning", "portrait")


def unwalled_tables(conn: sa.Connection) -> dict[str, str]:
    """Every base table holding tenant data (a `tenant` or `job_id` column) that lacks
    enabled + forced row-level security or the wall's two policies, with what is missing."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "  (SELECT array_agg(p.policyname::text ORDER BY p.policyname) FROM pg_policies p "
            "   WHERE p.schemaname = current_schema() AND p.tablename = c.relname) "
            "FROM pg_class c "
            "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' "
            "AND EXISTS (SELECT 1 FROM information_schema.columns i "
            "  WHERE i.table_schema = current_schema() AND i.table_name = c.relname "
            "  AND i.column_name IN ('tenant', 'job_id'))"
        )
    ).all()
    problems: dict[str, str] = {}
    for name, enabled, forced, policies in rows:
        missing = [
            what
            for what, ok in (
                ("ENABLE ROW LEVEL SECURITY", enabled),
                ("FORCE ROW LEVEL SECURITY", forced),
                (f"policy {TENANT_POLICY}", TENANT_POLICY in (policies or [])),
                (f"policy {OPERATOR_POLICY}", OPERATOR_POLICY in (policies or [])),
            )
            if not ok
        ]
        if missing:
            problems[name] = ", ".join(missing)
    return problems


def tenant_data_tables(conn: sa.Connection) -> set[str]:
    return set(
        conn.scalars(
            sa.text(
                "SELECT DISTINCT table_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND column_name IN ('tenant', 'job_id')"
            )
        )
    )


def seed(conn: sa.Connection, tenant: str) -> uuid.UUID:
    """One job of `tenant` with a row in every table keyed by job (as the owner: no wall)."""
    job_id, image_id = uuid.uuid4(), uuid.uuid4()
    conn.execute(
        sa.text(
            "INSERT INTO image (id, tenant, digest, content_type, size_bytes, data, created_at) "
            "VALUES (:i, :t, :sha, 'image/jpeg', 3, '\\x010203', :at)"
        ),
        {"i": image_id, "t": tenant, "sha": uuid.uuid4().hex, "at": T0},
    )
    conn.execute(
        sa.text(
            "INSERT INTO job (id, tenant, status, front_image_id, portrait, attempts, api_calls, "
            "created_at) VALUES (:j, :t, 'succeeded', :i, true, 1, 1, :at)"
        ),
        {"j": job_id, "t": tenant, "i": image_id, "at": T0},
    )
    conn.execute(
        sa.text("INSERT INTO attempt (job_id, number, started_at) VALUES (:j, 1, :at)"),
        {"j": job_id, "at": T0},
    )
    conn.execute(
        sa.text("INSERT INTO job_event (job_id, at, kind) VALUES (:j, :at, 'replay')"),
        {"j": job_id, "at": T0},
    )
    conn.execute(
        sa.text(
            "INSERT INTO result (job_id, request_id, warning_service_disabled, created_at) "
            "VALUES (:j, 'req', false, :at)"
        ),
        {"j": job_id, "at": T0},
    )
    conn.execute(
        sa.text("INSERT INTO warning (job_id, code, name) VALUES (:j, -9102, 'photocopy')"),
        {"j": job_id},
    )
    conn.execute(
        sa.text("INSERT INTO portrait (job_id, data) VALUES (:j, '\\x0405')"), {"j": job_id}
    )
    return job_id


def as_tenant(conn: sa.Connection, tenant: str | None) -> None:
    """What a tenant session does at transaction start (worker.store.engine.enter_tenant)."""
    conn.exec_driver_sql(f"SET LOCAL ROLE {TENANT_ROLE}")
    if tenant is not None:
        conn.execute(sa.text("SELECT set_config(:k, :t, true)"), {"k": TENANT_SETTING, "t": tenant})


@pytest.fixture
def conn(db_connection: sa.Connection) -> Iterator[sa.Connection]:
    """The test's connection (rolled back afterwards) with two tenants' data in it."""
    yield db_connection


@pytest.fixture
def two_tenants(conn: sa.Connection) -> dict[str, uuid.UUID]:
    return {"acme": seed(conn, "acme"), "globex": seed(conn, "globex")}


# ------------------------------------------------------------------------------ the schema


def test_every_table_with_tenant_data_is_walled(conn: sa.Connection) -> None:
    tables = tenant_data_tables(conn)
    # Guards the check against finding nothing to check.
    assert {"job", "image", *JOB_TABLES} <= tables
    assert unwalled_tables(conn) == {}


def test_a_new_table_without_the_wall_is_caught_and_the_helper_walls_it(
    conn: sa.Connection,
) -> None:
    # What a later migration would add: a table with a tenant column.
    conn.execute(
        sa.text("CREATE TABLE api_key_probe (id serial PRIMARY KEY, tenant varchar(64) NOT NULL)")
    )
    assert unwalled_tables(conn) == {
        "api_key_probe": "ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY, "
        f"policy {TENANT_POLICY}, policy {OPERATOR_POLICY}"
    }
    enable_tenant_rls(Operations(MigrationContext.configure(conn)), "api_key_probe")
    assert unwalled_tables(conn) == {}
    conn.execute(sa.text("INSERT INTO api_key_probe (tenant) VALUES ('acme'), ('globex')"))
    as_tenant(conn, "globex")
    # The tenant role got the table and its sequence: it may insert for itself.
    conn.execute(sa.text("INSERT INTO api_key_probe (tenant) VALUES ('globex')"))
    assert conn.scalars(sa.text("SELECT tenant FROM api_key_probe")).all() == ["globex"] * 2


# ---------------------------------------------------------------------- reads behind the wall


def test_a_raw_query_as_a_tenant_sees_only_that_tenants_rows(
    conn: sa.Connection, two_tenants: dict[str, uuid.UUID]
) -> None:
    as_tenant(conn, "acme")
    assert conn.execute(sa.text("SELECT id, tenant FROM job")).all() == [
        (two_tenants["acme"], "acme")
    ]
    assert conn.scalars(sa.text("SELECT tenant FROM image")).all() == ["acme"]
    for table in JOB_TABLES:
        seen = conn.scalars(sa.text(f"SELECT job_id FROM {table}")).all()
        assert seen == [two_tenants["acme"]], table
    # Asking for the other tenant's job by id finds nothing either.
    other = conn.scalar(
        sa.text("SELECT count(*) FROM job WHERE id = :j"), {"j": two_tenants["globex"]}
    )
    assert other == 0


def test_without_a_tenant_the_tenant_role_sees_nothing(
    conn: sa.Connection, two_tenants: dict[str, uuid.UUID]
) -> None:
    as_tenant(conn, None)
    for table in ("job", "image", *JOB_TABLES):
        assert conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) == 0, table


def test_the_operator_role_sees_every_tenant(
    conn: sa.Connection, two_tenants: dict[str, uuid.UUID]
) -> None:
    conn.exec_driver_sql(f"SET LOCAL ROLE {OPERATOR_ROLE}")
    assert set(conn.scalars(sa.text("SELECT tenant FROM job"))) == {"acme", "globex"}
    for table in JOB_TABLES:
        seen = set(conn.scalars(sa.text(f"SELECT job_id FROM {table}")))
        assert seen == set(two_tenants.values()), table


# --------------------------------------------------------------------- writes behind the wall


def _refused(conn: sa.Connection, sql: str, params: dict[str, object]) -> str:
    with conn.begin_nested() as savepoint:
        with pytest.raises(ProgrammingError) as info:
            conn.execute(sa.text(sql), params)
        savepoint.rollback()
    return str(info.value.orig)


def test_a_tenant_cannot_write_rows_for_another_tenant(
    conn: sa.Connection, two_tenants: dict[str, uuid.UUID]
) -> None:
    as_tenant(conn, "acme")
    message = _refused(
        conn,
        "INSERT INTO job (id, tenant, status, front_url, portrait, attempts, api_calls, "
        "created_at) VALUES (:j, 'globex', 'queued', 'https://e.invalid/a.jpg', false, 0, 0, :at)",
        {"j": uuid.uuid4(), "at": T0},
    )
    assert "row-level security" in message
    # Moving its own job to another tenant is refused too (WITH CHECK on the new row).
    assert "row-level security" in _refused(
        conn, "UPDATE job SET tenant = 'globex' WHERE id = :j", {"j": two_tenants["acme"]}
    )
    # A child row pointing at the other tenant's job.
    assert "row-level security" in _refused(
        conn,
        "INSERT INTO attempt (job_id, number, started_at) VALUES (:j, 2, :at)",
        {"j": two_tenants["globex"], "at": T0},
    )
    # Updates and deletes of the other tenant's rows touch nothing (they cannot see them).
    hit = conn.execute(
        sa.text("DELETE FROM result WHERE job_id = :j"), {"j": two_tenants["globex"]}
    ).rowcount
    assert hit == 0
    # Its own rows it writes as before.
    conn.execute(
        sa.text("INSERT INTO attempt (job_id, number, started_at) VALUES (:j, 2, :at)"),
        {"j": two_tenants["acme"], "at": T0},
    )
    conn.exec_driver_sql("RESET ROLE")
    owner_view = conn.scalar(
        sa.text("SELECT count(*) FROM result WHERE job_id = :j"), {"j": two_tenants["globex"]}
    )
    assert owner_view == 1


# ------------------------------------------------------------------- the application's side


@pytest.fixture
def committed(
    fresh_migrated_database: Callable[[], str],
) -> Iterator[tuple[sa.Engine, dict[str, uuid.UUID]]]:
    url = fresh_migrated_database()
    # One pooled connection: the tenant session's successor reuses the very same one.
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    with engine.begin() as conn:
        ids = {"acme": seed(conn, "acme"), "globex": seed(conn, "globex")}
    yield engine, ids
    engine.dispose()


def test_tenant_sessions_are_walled_and_leave_nothing_on_the_pooled_connection(
    committed: tuple[sa.Engine, dict[str, uuid.UUID]],
) -> None:
    engine, ids = committed
    tenant: sessionmaker[Session] = make_tenant_sessionmaker(engine, "globex")
    with tenant() as session:
        # No tenant filter in the query: the database applies it.
        assert [j.id for j in session.scalars(sa.select(Job))] == [ids["globex"]]
        assert session.scalar(sa.text("SELECT current_user")) == TENANT_ROLE
        session.commit()
        # A second transaction in the same session is walled again.
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1
    # The role and the tenant ended with the transaction: an operator session on the same
    # pooled connection is the login's own role again and sees every tenant.
    with make_sessionmaker(engine)() as session:
        assert session.scalar(sa.text("SELECT current_user")) == "postgres"
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 2


def test_downgrade_takes_the_wall_down_and_upgrade_puts_it_back(
    fresh_migrated_database: Callable[[], str],
) -> None:
    url = fresh_migrated_database()
    engine = sa.create_engine(url)
    try:
        migrations.downgrade(url, "0004")
        with engine.connect() as conn:
            walled = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_class WHERE relrowsecurity "
                    "AND relnamespace = current_schema()::regnamespace"
                )
            )
            policies = conn.scalar(sa.text("SELECT count(*) FROM pg_policies"))
        assert (walled, policies) == (0, 0)
        migrations.upgrade(url)
        with engine.connect() as conn:
            assert unwalled_tables(conn) == {}
    finally:
        engine.dispose()


# ------------------------------------------------------------------ least-privilege logins


def test_least_privilege_logins_see_what_their_role_allows(pg_admin_url: str) -> None:
    """The production role model: a non-superuser owner runs the migrations; the worker's
    login is a member of the operator role; a tenant-facing login only of the tenant role."""
    suffix = uuid.uuid4().hex[:8]
    owner, worker, tenant_app = (f"{PG_PREFIX}_{kind}_{suffix}" for kind in ("own", "wrk", "app"))
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    database = f"{PG_PREFIX}_lp_{suffix}"

    def login_url(user: str) -> str:
        url = sa.make_url(pg_admin_url).set(username=user, database=database)
        return url.render_as_string(hide_password=False)

    try:
        with admin.connect() as conn:
            # CREATEROLE: the first migration may create the two roles on a new cluster.
            conn.exec_driver_sql(f'CREATE ROLE "{owner}" LOGIN CREATEROLE')
            conn.exec_driver_sql(f'CREATE DATABASE "{database}" OWNER "{owner}"')
            conn.exec_driver_sql(f'CREATE ROLE "{worker}" LOGIN IN ROLE {OPERATOR_ROLE}')
            conn.exec_driver_sql(f'CREATE ROLE "{tenant_app}" LOGIN IN ROLE {TENANT_ROLE}')
        migrations.upgrade(login_url(owner))
        owner_engine = sa.create_engine(login_url(owner))
        with owner_engine.begin() as conn:
            ids = {"acme": seed(conn, "acme"), "globex": seed(conn, "globex")}
        for user in (owner, worker):
            engine = sa.create_engine(login_url(user))
            with make_sessionmaker(engine)() as session:
                # Row-level security is forced even on the owner: the operator role lets it
                # (and the worker) see every tenant.
                assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 2, user
                # ...at no cost: its policy folds to true, the plan gains no filter.
                plan = "\n".join(
                    session.scalars(
                        sa.text("EXPLAIN SELECT * FROM attempt WHERE job_id = :j"),
                        {"j": ids["acme"]},
                    )
                )
                assert "SubPlan" not in plan and "current_setting" not in plan, plan
            engine.dispose()
        engine = sa.create_engine(login_url(tenant_app))
        with engine.connect() as conn:
            # No tenant set: nothing, although the query has no filter at all.
            assert conn.scalar(sa.text("SELECT count(*) FROM job")) == 0
            with pytest.raises(ProgrammingError, match="permission denied"):
                conn.exec_driver_sql(f"SET ROLE {OPERATOR_ROLE}")
        with make_tenant_sessionmaker(engine, "acme")() as session:
            assert [j.id for j in session.scalars(sa.select(Job))] == [ids["acme"]]
        engine.dispose()
        owner_engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            for role in (tenant_app, worker, owner):
                conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()
