"""Shared test plumbing: real services are required, never faked, in integration tests.

Under CI=true a missing Redis or PostgreSQL fails the run; elsewhere those tests skip.
Each fixture family lives in its own plugin module under tests/fixtures/.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
import structlog

pytest_plugins = [
    "tests.fixtures.database",
    "tests.fixtures.emulator",
    "tests.fixtures.workers",
    "tests.fixtures.api_server",
]

REDIS_URL = os.environ.get("MACAO_OCR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get(
    "MACAO_OCR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# Fixtures that reach a real Redis, PostgreSQL or worker fleet: only integration tests use them.
SERVER_FIXTURES = frozenset(
    {
        "redis_url",
        "clean_redis",
        "pg_admin_url",
        "migrated_pg_url",
        "db_engine",
        "db_connection",
        "session_factory",
        "transactions",
        "db_session",
        "fresh_migrated_database",
        "celery_workers",
        "worker_env",
    }
)


@pytest.fixture(autouse=True)
def data_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built in the test process find the run's keys (as a deployment's would);
    a test about missing keys deletes them with monkeypatch."""
    from tests.fixtures.workers import KEY_VARIABLES, TEST_DEFAULTS

    for name in KEY_VARIABLES:
        monkeypatch.setenv(name, TEST_DEFAULTS[name])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/integration are marked `integration`; a test under tests/unit that
    needs a server is a mistake of placement, reported before anything runs."""
    misplaced = []
    for item in items:
        parts = item.path.parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "unit" in parts:
            needs = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
            if needs:
                misplaced.append(f"{item.nodeid} uses {', '.join(sorted(needs))}")
    if misplaced:
        raise pytest.UsageError(
            "unit tests must not need a server; move these to tests/integration:\n"
            + "\n".join(misplaced)
        )


def require_service(name: str, problem: str) -> None:
    """Fail under CI (a missing service is a broken run), skip on a developer's laptop."""
    message = f"{name} is not reachable: {problem}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis for integration tests (db 15 unless MACAO_OCR_TEST_REDIS_URL says)."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))
    return REDIS_URL


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """The test Redis database, emptied before and after the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """A real PostgreSQL where tests may create and drop databases."""
    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except sa.exc.OperationalError as exc:
        require_service("PostgreSQL", str(exc.orig))
    return PG_ADMIN_URL


def create_database(admin_url: str, prefix: str = "macao_ocr_test") -> str:
    """Create an empty PostgreSQL database and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    name = sa.make_url(url).database
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger and structlog as they were: a test that configures logging (the
    CLI does, for its process, and under CliRunner that process is pytest's) leaves none."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
