"""What the project exposes by default: file modes, listening addresses, the secrets a child
process inherits, the emulator's control plane, and TLS settings for Redis and PostgreSQL."""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

import migrations
from emulator.app import create_app as create_emulator
from emulator.config import CONTROL_TOKEN_HEADER, EmulatorConfig
from worker import metrics
from worker.app import create_app
from worker.cli.ops_cmd import flower_command
from worker.errors import ConfigError
from worker.settings import Settings, load_settings
from worker.store.engine import make_engine


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common 022 umask, under which SQLite alone would create a 0644 file."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------ the SQLite file


def test_the_sqlite_database_is_created_owner_only(tmp_path: Path, loose_umask: None) -> None:
    db = tmp_path / "jobs.db"
    engine = make_engine(Settings(database_url=f"sqlite:///{db}"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            # WAL mode: the -wal and -shm files hold the same data; SQLite gives them the
            # database file's mode.
            assert _mode(db) == 0o600
            for side in ("-wal", "-shm"):
                side_file = Path(f"{db}{side}")
                if side_file.exists():
                    assert _mode(side_file) == 0o600, side
    finally:
        engine.dispose()


def test_db_upgrade_creates_the_sqlite_file_owner_only(tmp_path: Path, loose_umask: None) -> None:
    db = tmp_path / "migrated.db"
    migrations.upgrade(f"sqlite:///{db}")
    assert _mode(db) == 0o600


def test_an_existing_sqlite_file_keeps_its_mode(tmp_path: Path, loose_umask: None) -> None:
    db = tmp_path / "shared.db"
    db.touch(mode=0o640)
    make_engine(Settings(database_url=f"sqlite:///{db}")).dispose()
    assert _mode(db) == 0o640


# -------------------------------------------------------------------------------- metrics


def test_metrics_listen_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'm.db'}",
        "broker_url": "redis://127.0.0.1:1/0",
    }
    assert Settings().metrics_host == "127.0.0.1"
    server = metrics.serve_metrics(Settings(**base), port=0)
    assert server is not None
    try:
        assert server.address == "127.0.0.1"
        assert server.server.server_address[0] == "127.0.0.1"
    finally:
        server.close()
    os.environ["MACAO_OCR_METRICS_HOST"] = "0.0.0.0"
    try:
        settings = load_settings(**base)
    finally:
        del os.environ["MACAO_OCR_METRICS_HOST"]
    server = metrics.serve_metrics(settings, port=0)
    assert server is not None
    try:
        assert server.server.server_address[0] == "0.0.0.0"
    finally:
        server.close()


# --------------------------------------------------------------------------------- Flower


SECRETS = {
    "TENCENTCLOUD_SECRET_KEY": "tc-secret",
    "TENCENTCLOUD_SESSION_TOKEN": "tc-token",
    "MACAO_OCR_SECRET_KEY": "our-alias-secret",
    "MACAO_OCR_SESSION_TOKEN": "our-alias-token",
    "MACAO_OCR_DATA_KEYS": "k1:AAAA",
    "MACAO_OCR_DATA_KEYS_FILE": "/run/secrets/keys",
    "MACAO_OCR_LOOKUP_KEY": "lookup",
    "MACAO_OCR_DATABASE_URL": "postgresql://macao:db-password@db/macao_ocr",
}


def test_flower_inherits_neither_the_api_secret_nor_the_data_keys_nor_the_database() -> None:
    env = {
        **SECRETS,
        "MACAO_OCR_BROKER_URL": "redis://127.0.0.1:6379/0",
        "TENCENTCLOUD_SECRET_ID": "AKIDpublic",
        "PATH": "/usr/bin",
    }
    _, child = flower_command(Settings(flower_password="pw"), env)
    assert not set(SECRETS) & set(child)
    for value in SECRETS.values():
        assert value not in child.values()
    # What Flower needs is still there.
    assert child["MACAO_OCR_BROKER_URL"] == env["MACAO_OCR_BROKER_URL"]
    assert child["PATH"] == "/usr/bin" and child["FLOWER_BASIC_AUTH"] == "admin:pw"


def test_flower_binds_loopback_by_default() -> None:
    settings = Settings(flower_password="pw")
    argv, _ = flower_command(settings, {})
    assert "--address=127.0.0.1" in argv
    # Flower's own variable, or the option, opens it on purpose.
    argv, _ = flower_command(settings, {"FLOWER_ADDRESS": "10.0.0.5"})
    assert not any(a.startswith("--address") for a in argv)
    argv, _ = flower_command(settings, {}, address="0.0.0.0")
    assert "--address=0.0.0.0" in argv and "--address=127.0.0.1" not in argv


# -------------------------------------------------------------------------- the endpoint


@pytest.mark.parametrize(
    "endpoint", ["http://10.1.2.3:8089", "http://emulator:8089", "http://ocr.example.com"]
)
def test_a_plain_http_endpoint_off_this_host_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(api_endpoint=endpoint)
    assert "MACAO_OCR_ALLOW_INSECURE_ENDPOINT" in info.value.message
    assert "MACAO_OCR_API_ENDPOINT" in info.value.message
    assert load_settings(api_endpoint=endpoint, allow_insecure_endpoint=True).api_endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8089",
        "http://127.8.9.10:1",
        "http://localhost:8089",
        "http://[::1]:8089",
        "https://ocr.intl.tencentcloudapi.com",
        "https://10.1.2.3",
    ],
)
def test_tls_or_loopback_endpoints_are_accepted(endpoint: str) -> None:
    assert load_settings(api_endpoint=endpoint).api_endpoint == endpoint


# -------------------------------------------------------------------- the emulator's control


@pytest.fixture
async def guarded_emulator() -> object:
    app = create_emulator(EmulatorConfig(credentials={"AKIDx": "k"}, control_token="tok-123"))
    async with TestClient(TestServer(app)) as client:
        yield client


CONTROL = [
    ("GET", "/__emulator__/counters"),
    ("GET", "/__emulator__/config"),
    ("POST", "/__emulator__/config"),
    ("POST", "/__emulator__/reset"),
]


async def test_emulator_control_endpoints_need_the_token(guarded_emulator: TestClient) -> None:
    client = guarded_emulator
    for method, path in CONTROL:
        body = {"ocr_failed": 1.0} if method == "POST" else None
        for headers in ({}, {CONTROL_TOKEN_HEADER: "wrong"}):
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert CONTROL_TOKEN_HEADER in (await resp.json())["error"]
        resp = await client.request(
            method, path, json=body if path != "/__emulator__/config" else {},
            headers={CONTROL_TOKEN_HEADER: "tok-123"},
        )  # fmt: skip
        assert resp.status == 200, (method, path)
    # The refused POST changed nothing.
    resp = await client.get("/__emulator__/config", headers={CONTROL_TOKEN_HEADER: "tok-123"})
    assert (await resp.json())["ocr_failed"] == 0.0
    # Liveness stays open (healthchecks), and carries nothing.
    assert (await client.get("/__emulator__/health")).status == 200


async def test_without_a_token_the_control_endpoints_are_closed() -> None:
    app = create_emulator(EmulatorConfig(credentials={"AKIDx": "k"}))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/__emulator__/counters", headers={CONTROL_TOKEN_HEADER: ""})
        assert resp.status == 403
        assert "MACAO_OCR_EMULATOR_TOKEN" in (await resp.json())["error"]


# -------------------------------------------------------------------- TLS to Redis and SQL


def test_a_rediss_broker_verifies_the_server_certificate() -> None:
    app = create_app(Settings(broker_url="rediss://:pw@redis.internal:6380/0"))
    try:
        conn = app.connection_for_write()
        assert conn.transport_cls == "rediss"
        assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        assert (conn.hostname, conn.port, conn.password) == ("redis.internal", 6380, "pw")
    finally:
        app.close()
    # TLS options in the URL are passed through (a private CA), as redis-py reads them too.
    url = "rediss://redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem"
    app = create_app(Settings(broker_url=url))
    try:
        assert app.connection_for_write().ssl == {"ssl_ca_certs": "/etc/ca.pem"}
    finally:
        app.close()
    client = redis.Redis.from_url(url)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    # A plain redis:// broker keeps our transport and no TLS.
    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/0"))
    try:
        assert app.connection_for_write().ssl is None
    finally:
        app.close()


def test_postgresql_sslmode_reaches_the_driver() -> None:
    url = (
        "postgresql://u:p@db.internal:5432/macao_ocr"
        "?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem"
    )
    settings = Settings(database_url=url)
    engine = make_engine(settings)
    try:
        _, connect_kwargs = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.dispose()
    assert connect_kwargs["sslmode"] == "verify-full"
    assert connect_kwargs["sslrootcert"] == "/etc/ssl/ca.pem"


def test_sslmode_require_is_enforced_by_the_driver(pg_admin_url: str) -> None:
    # The test server has no TLS: `require` must refuse to connect rather than fall back.
    url = sa.make_url(pg_admin_url).update_query_dict({"sslmode": "require"})
    engine = make_engine(Settings(database_url=url.render_as_string(hide_password=False)))
    try:
        with pytest.raises(sa.exc.OperationalError, match="SSL"), engine.connect():
            pass
    finally:
        engine.dispose()
