"""Start-up and health checks: the database (reachable, schema at head), Redis, credentials.

`macao-ocr worker` runs them before starting any worker process, `macao-ocr health` runs them
for an orchestrator's probe. Each check answers with what is wrong and what to run; none
raises for an unhealthy part (the caller decides), and no message carries a URL's password.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from worker.settings import Settings, env_name

CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    """One part's state: `ok`, what was found (`detail`) and, when not ok, what to do (`fix`)."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    latency_ms: float | None = None

    def line(self) -> str:
        """One human line: `database: ok (at head 0007)` or `redis: FAILED ... -> fix`."""
        state = "ok" if self.ok else "FAILED"
        text = f"{self.name}: {state}: {self.detail}"
        return text if self.fix is None else f"{text} (fix: {self.fix})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _reason(exc: BaseException) -> str:
    from worker.logs import scrub_text

    orig = getattr(exc, "orig", None)
    text = str(orig or exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return scrub_text(first)


def schema_revisions(settings: Settings) -> tuple[set[str], set[str]]:
    """(the database's current revisions, the migrations' heads); raises on a database error."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    import migrations
    from worker.store.engine import make_engine

    heads = set(ScriptDirectory.from_config(migrations.config()).get_heads())
    engine = make_engine(settings, **_connect_args(settings))
    # Alembic says "Context impl ..." at INFO each time: noise in a probe's output.
    alembic_log = logging.getLogger("alembic.runtime.migration")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        alembic_log.setLevel(level)
        engine.dispose()
    return current, heads


def _connect_args(settings: Settings) -> dict[str, Any]:
    if settings.database_url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": int(CONNECT_TIMEOUT_S)}, "pool_size": 1}
    return {}


def check_database(settings: Settings) -> Check:
    """Reachable, and migrated to this version's head revision."""
    started = time.monotonic()
    try:
        current, heads = schema_revisions(settings)
    except Exception as exc:
        return Check(
            "database",
            False,
            f"unreachable: {_reason(exc)}",
            f"check {env_name('database_url')} and that the server runs",
        )
    ms = round((time.monotonic() - started) * 1000, 1)
    upgrade = "run `macao-ocr db upgrade`"
    if not current:
        return Check("database", False, "not migrated (no schema)", upgrade, ms)
    if current != heads:
        found, want = ", ".join(sorted(current)), ", ".join(sorted(heads))
        return Check(
            "database", False, f"schema at {found}, this version needs {want}", upgrade, ms
        )
    return Check("database", True, f"schema at head {', '.join(sorted(heads))}", None, ms)


def check_redis(name: str, url: str, setting: str) -> Check:
    """A PING answered by the Redis at `url`."""
    import redis

    started = time.monotonic()
    client = redis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check(name, False, f"unreachable: {_reason(exc)}", f"check {setting}")
    finally:
        client.close()
    return Check(name, True, "answers", None, round((time.monotonic() - started) * 1000, 1))


def check_credentials(settings: Settings) -> Check:
    """Both halves of the API key are set (their values are never shown)."""
    if settings.credentials_configured:
        return Check("credentials", True, "set")
    missing = [
        env_name(field) for field in ("secret_id", "secret_key") if getattr(settings, field) is None
    ]
    return Check(
        "credentials", False, "missing " + ", ".join(missing), "set " + " and ".join(missing)
    )


def run_checks(settings: Settings, *, credentials: bool) -> list[Check]:
    """Every check, in the order an operator fixes them."""
    checks = [check_database(settings)]
    # Both named even when one server is both: an operator reads which role failed.
    checks.append(check_redis("redis", settings.state_redis_url, env_name("redis_url")))
    checks.append(check_redis("broker", settings.broker_url, env_name("broker_url")))
    if credentials:
        checks.append(check_credentials(settings))
    return checks
