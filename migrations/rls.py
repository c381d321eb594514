"""The tenant wall for migrations: PostgreSQL row-level security, one call per table.

Every migration that adds a table holding tenant data calls one of these after creating it:

    from migrations.rls import enable_tenant_rls, enable_job_rls, disable_rls
    enable_tenant_rls(op, "api_key")          # the table has a `tenant` column
    enable_job_rls(op, "webhook_delivery")    # the table has a `job_id` (no tenant column)
    ...
    disable_rls(op, "api_key")                # in downgrade, before dropping the table

Two policies on each table (both PERMISSIVE, so a role that holds both sees the union):

- `tenant_wall`, for `macao_ocr_tenant`: only rows of the session's tenant
  (`set_config('macao_ocr.tenant', ...)`, set by worker.store.engine at transaction start)
  are visible, and a row for another tenant cannot be written (WITH CHECK). No tenant set:
  nothing is visible.
- `operator_all`, for `macao_ocr_operator`: every row (the worker, the sweeper, migrations and
  the operator's `--all-tenants` commands).

Row-level security is FORCEd, so the table's owner is walled too unless it is a member of
`macao_ocr_operator` (the first migration makes the migrating login one). Superusers always
bypass row-level security: production logins should not be superusers.

On any database but PostgreSQL every function is a no-op (SQLite has no roles; the
application's WHERE clauses are the only wall there).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from worker.store.engine import OPERATOR_ROLE, TENANT_ROLE, TENANT_SETTING

TENANT_POLICY = "tenant_wall"
OPERATOR_POLICY = "operator_all"
# '' is what a transaction-local setting leaves behind once its transaction ends: no tenant.
CURRENT_TENANT = f"NULLIF(current_setting('{TENANT_SETTING}', true), '')"
PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


def _is_postgresql(op: Any) -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def _ident(op: Any, name: str) -> str:
    return str(op.get_bind().dialect.identifier_preparer.quote(name))


def ensure_roles(op: Any) -> None:
    """Create the two NOLOGIN roles (cluster-wide, so maybe already there) and make the
    migrating login a member of both: it may then SET ROLE to the tenant role, and it passes
    the operator policy on the tables it owns."""
    if not _is_postgresql(op):
        return
    for role in (TENANT_ROLE, OPERATOR_ROLE):
        # Another database's migration may create the same role at the same moment.
        op.execute(
            f"""
            DO $$
            BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                    BEGIN
                        CREATE ROLE {role} NOLOGIN;
                    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                    END;
                END IF;
                -- A superuser counts as a member of every role already.
                IF NOT pg_has_role(current_user, '{role}', 'MEMBER') THEN
                    BEGIN
                        GRANT {role} TO CURRENT_USER;
                    EXCEPTION WHEN insufficient_privilege THEN
                        RAISE EXCEPTION 'the migrating login % must be a member of {role}',
                            current_user
                            USING HINT = format('as a superuser: GRANT {role} TO %I', current_user);
                    END;
                END IF;
            END
            $$
            """
        )


def _grant(op: Any, table: str) -> None:
    quoted = _ident(op, table)
    op.execute(f"GRANT {PRIVILEGES} ON {quoted} TO {TENANT_ROLE}, {OPERATOR_ROLE}")
    # Serial and identity columns: an INSERT as either role draws from their sequences.
    sequences = op.get_bind().execute(
        sa.text(
            "SELECT s.relname FROM pg_class s "
            "JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid "
            "JOIN pg_class t ON d.refobjid = t.oid "
            "WHERE s.relkind = 'S' AND t.relname = :table "
            "AND t.relnamespace = current_schema()::regnamespace"
        ),
        {"table": table},
    )
    for (sequence,) in sequences:
        op.execute(
            f"GRANT USAGE, SELECT ON SEQUENCE {_ident(op, sequence)} "
            f"TO {TENANT_ROLE}, {OPERATOR_ROLE}"
        )


def _enable(op: Any, table: str, tenant_condition: str) -> None:
    quoted = _ident(op, table)
    op.execute(f"ALTER TABLE {quoted} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {quoted} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY {TENANT_POLICY} ON {quoted} AS PERMISSIVE FOR ALL TO {TENANT_ROLE} "
        f"USING ({tenant_condition}) WITH CHECK ({tenant_condition})"
    )
    op.execute(
        f"CREATE POLICY {OPERATOR_POLICY} ON {quoted} AS PERMISSIVE FOR ALL TO {OPERATOR_ROLE} "
        "USING (true) WITH CHECK (true)"
    )
    _grant(op, table)


def enable_tenant_rls(op: Any, table: str, *, column: str = "tenant") -> None:
    """Wall a table that carries its tenant in `column`."""
    if not _is_postgresql(op):
        return
    _enable(op, table, f"{_ident(op, column)} = {CURRENT_TENANT}")


def enable_job_rls(
    op: Any, table: str, *, column: str = "job_id", parent: str = "job", parent_key: str = "id"
) -> None:
    """Wall a table whose rows belong to a job: visible and writable when the parent job
    (`parent.parent_key = table.column`) is the session tenant's."""
    if not _is_postgresql(op):
        return
    # Every name is quoted as an identifier; nothing here comes from outside the migration.
    condition = (
        f"EXISTS (SELECT 1 FROM {_ident(op, parent)} p "  # noqa: S608
        f"WHERE p.{_ident(op, parent_key)} = {_ident(op, table)}.{_ident(op, column)} "
        f"AND p.tenant = {CURRENT_TENANT})"
    )
    _enable(op, table, condition)


def disable_rls(op: Any, table: str) -> None:
    """Undo enable_*_rls on a table (the roles stay: other databases may use them)."""
    if not _is_postgresql(op):
        return
    quoted = _ident(op, table)
    op.execute(f"DROP POLICY IF EXISTS {TENANT_POLICY} ON {quoted}")
    op.execute(f"DROP POLICY IF EXISTS {OPERATOR_POLICY} ON {quoted}")
    op.execute(f"ALTER TABLE {quoted} NO FORCE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {quoted} DISABLE ROW LEVEL SECURITY")
    op.execute(f"REVOKE ALL ON {quoted} FROM {TENANT_ROLE}, {OPERATOR_ROLE}")


def tenant_tables(op: Any) -> list[str]:
    """Base tables of the current schema that have a `tenant` column."""
    return _tables_with(op, "tenant")


def job_tables(op: Any) -> list[str]:
    """Base tables of the current schema with a `job_id` column and no `tenant` column."""
    tenant = set(tenant_tables(op))
    return [t for t in _tables_with(op, "job_id") if t not in tenant]


def walled_tables(op: Any) -> list[str]:
    """Tables that carry the tenant wall's policy."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT tablename FROM pg_policies "
            "WHERE schemaname = current_schema() AND policyname = :p ORDER BY tablename"
        ),
        {"p": TENANT_POLICY},
    )
    return [str(name) for (name,) in rows]


def _tables_with(op: Any, column: str) -> list[str]:
    rows = op.get_bind().execute(
        sa.text(
            "SELECT c.table_name FROM information_schema.columns c "
            "JOIN information_schema.tables t "
            "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
            "WHERE c.table_schema = current_schema() AND c.column_name = :column "
            "AND t.table_type = 'BASE TABLE' ORDER BY c.table_name"
        ),
        {"column": column},
    )
    return [str(name) for (name,) in rows]
