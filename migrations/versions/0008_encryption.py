"""Encryption at rest: personal columns become AES-256-GCM envelopes (bytes); keyed digests.

- `result`'s personal fields (worker/privacy/fields.py), `job.front_url`/`back_url` and
  `kept_answer.response_json` become bytes (bytea); `image.data` and `portrait.data` already
  are. Every value is sealed by worker/privacy/seal.py, bound to its row and column.
- `image.sha256` (a plain digest that confirms a known card image) becomes `image.digest`,
  an HMAC under a subkey of the data key.
- `result.id_number_hash` (bytea, indexed): HMAC-SHA256 of the ID number under
  MACAO_OCR_LOOKUP_KEY, for lookup by ID number.

Existing rows: when the database holds any job, this revision encrypts every existing value
in place, under the key ring of MACAO_OCR_DATA_KEYS / MACAO_OCR_DATA_KEYS_FILE (and writes
the lookup hashes if MACAO_OCR_LOOKUP_KEY is set); without keys it refuses, changing nothing.
An empty database needs no keys. Downgrade refuses while any job exists (the values would
have to be decrypted back into plaintext columns: restore a backup instead).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, type before this revision) of the columns that become bytes.
SEALED: tuple[tuple[str, str, sa.types.TypeEngine[Any]], ...] = (
    ("job", "front_url", sa.Text()),
    ("job", "back_url", sa.Text()),
    ("result", "cn_last_name", sa.Text()),
    ("result", "en_last_name", sa.Text()),
    ("result", "last_name_code", sa.Text()),
    ("result", "cn_first_name", sa.Text()),
    ("result", "en_first_name", sa.Text()),
    ("result", "first_name_code", sa.Text()),
    ("result", "id_number", sa.Text()),
    ("result", "birthday", sa.Date()),
    ("result", "first_issue_date", sa.Date()),
    ("result", "current_issue_date", sa.Date()),
    ("result", "validity_period", sa.Date()),
    ("result", "validity_period_text", sa.Text()),
    ("result", "symbol", sa.Text()),
    ("result", "height_m", sa.Numeric(4, 2)),
    ("kept_answer", "response_json", sa.Text()),
)
NOT_NULL = {("kept_answer", "response_json")}


def _has_rows() -> bool:
    return op.get_bind().execute(sa.text("SELECT 1 FROM job LIMIT 1")).first() is not None


def _sealer() -> Any:
    # A migration is an entry point: reading Settings (the environment) here is allowed.
    from worker.errors import ConfigError
    from worker.privacy.seal import Sealer
    from worker.settings import load_settings

    try:
        return Sealer.from_settings(load_settings())
    except ConfigError as err:
        raise ConfigError(
            "revision 0008 encrypts the personal data already stored, and needs the data "
            f"keys to do it: {err.message}"
        ) from None


def _text(value: Any) -> str | None:
    """A stored plaintext value as the text the sealer seals."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float | int | Decimal):
        return f"{Decimal(str(value)):.2f}"
    return str(value)


def _alter(table: str, column: str, old: sa.types.TypeEngine[Any]) -> None:
    nullable = (table, column) not in NOT_NULL
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"ALTER TABLE {table} ALTER COLUMN {column} TYPE bytea "
            f"USING convert_to({column}::text, 'UTF8')"
        )
        return
    with op.batch_alter_table(table) as batch:
        batch.alter_column(
            column, existing_type=old, type_=sa.LargeBinary(), existing_nullable=nullable
        )


def _table(name: str, key: str, *columns: str) -> sa.TableClause:
    # Lightweight tables: the rows are read raw (the models describe the new schema).
    cols = [sa.column(key, sa.Uuid()), *(sa.column(c, sa.LargeBinary()) for c in columns)]
    return sa.table(name, *cols)


def _encrypt_existing(sealer: Any) -> None:
    conn = op.get_bind()
    for name, key in (("job", "id"), ("result", "job_id"), ("kept_answer", "job_id")):
        columns = [c for t, c, _ in SEALED if t == name]
        written = [*columns, "id_number_hash"] if name == "result" else columns
        table = _table(name, key, *written)
        read = sa.select(table.c[key], *(sa.column(c) for c in columns)).select_from(table)
        for row in conn.execute(read).all():
            row_id = row[0]
            values = {c: _text(v) for c, v in zip(columns, row[1:], strict=True)}
            sealed = {c: sealer.seal_text(name, c, row_id, v) for c, v in values.items()}
            if name == "result":
                sealed["id_number_hash"] = sealer.lookup_hash(values["id_number"])
            conn.execute(sa.update(table).where(table.c[key] == row_id).values(**sealed))
    image = _table("image", "id", "data")
    image.append_column(sa.column("digest"))
    for row in conn.execute(sa.select(image.c.id, image.c.data)).all():
        data = bytes(row[1])
        conn.execute(
            sa.update(image)
            .where(image.c.id == row[0])
            .values(data=sealer.seal_image(row[0], data), digest=sealer.image_digest(data))
        )
    portrait = _table("portrait", "job_id", "data")
    for row in conn.execute(sa.select(portrait.c.job_id, portrait.c.data)).all():
        conn.execute(
            sa.update(portrait)
            .where(portrait.c.job_id == row[0])
            .values(data=sealer.seal_portrait(row[0], bytes(row[1])))
        )


def upgrade() -> None:
    # Keys first: without them nothing is changed.
    sealer = _sealer() if _has_rows() else None
    for table, column, old in SEALED:
        _alter(table, column, old)
    op.drop_index("ix_image_tenant_sha256", table_name="image")
    with op.batch_alter_table("image") as batch:
        batch.alter_column("sha256", new_column_name="digest", existing_type=sa.String(64))
    op.create_index("ix_image_tenant_digest", "image", ["tenant", "digest"])
    with op.batch_alter_table("result") as batch:
        batch.add_column(sa.Column("id_number_hash", sa.LargeBinary(), nullable=True))
    op.create_index("ix_result_id_number_hash", "result", ["id_number_hash"])
    if sealer is not None:
        _encrypt_existing(sealer)


def downgrade() -> None:
    if _has_rows():
        from worker.errors import ConfigError

        raise ConfigError(
            "revision 0008 cannot be undone while jobs exist: their personal data is "
            "encrypted and would have to be written back as plaintext (restore a backup)"
        )
    op.drop_index("ix_result_id_number_hash", table_name="result")
    with op.batch_alter_table("result") as batch:
        batch.drop_column("id_number_hash")
    op.drop_index("ix_image_tenant_digest", table_name="image")
    with op.batch_alter_table("image") as batch:
        batch.alter_column("digest", new_column_name="sha256", existing_type=sa.String(64))
    op.create_index("ix_image_tenant_sha256", "image", ["tenant", "sha256"])
    for table, column, old in SEALED:
        nullable = (table, column) not in NOT_NULL
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                column,
                existing_type=sa.LargeBinary(),
                type_=old,
                existing_nullable=nullable,
                postgresql_using=f"NULL::{old.compile(dialect=op.get_bind().dialect)}",
            )
