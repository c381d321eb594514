"""Alembic migrations, runnable from anywhere (also when installed non-editable).

`config()` builds the Alembic configuration in code, with `script_location` pointing at this
package's directory, so no alembic.ini has to be found on disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent


def config(database_url: str | None = None) -> Config:
    """An Alembic Config for this package; without a URL, env.py reads it from Settings."""
    # Alembic's default stdout is bound at its import; take the current one (CLI runners swap it).
    cfg = Config(stdout=sys.stdout)
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if database_url is not None:
        # ConfigParser interpolation would eat a '%' in a URL-encoded password.
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Migrate a database up to `revision`."""
    command.upgrade(config(database_url), revision)


def downgrade(database_url: str | None, revision: str) -> None:
    """Migrate a database down to `revision` ("base" empties it)."""
    command.downgrade(config(database_url), revision)
