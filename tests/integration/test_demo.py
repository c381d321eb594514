"""`macao-ocr demo` end to end, in a clean environment, plus its embedded broker.

The demo needs no configured server: each run starts its own broker, SQLite file, emulator and
a real Celery worker, and must leave none of them behind. Children carry the run's id in their
environment (MACAO_OCR_DEMO_RUN), so /proc tells whether anything survived the run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
import sqlalchemy as sa
from typer.testing import CliRunner

from demo.embedded_broker import BrokerError, start_broker
from demo.run import (
    RUN_MARKER_VAR,
    DemoError,
    DemoPlan,
    check_plan,
    demo_environment,
    settings_from_env,
    specimen_cards,
    wants_real_service,
)
from worker.cli import app as cli_app

pytestmark = pytest.mark.integration

MACAO_OCR = Path(sys.executable).with_name("macao-ocr")
SUMMARY = re.compile(
    r"demo: (?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<refused>\d+) refused "
    r"\((?P<cards>\d+) cards"
)
BATCH = re.compile(r"batch demo-(?P<run>[0-9a-f]+)")
BROKER = re.compile(r"broker: \S+ at redis://127\.0\.0\.1:(?P<port>\d+)/")
DATABASE = re.compile(r"database: SQLite (?P<path>\S+) \(migrated\)")
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without any of the project's or Tencent's variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MACAO_OCR_", "TENCENTCLOUD_", "PROMETHEUS_"))
    }
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200", **extra)
    return env


def run_demo_cli(
    args: list[str], cwd: Path, timeout_s: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MACAO_OCR), "demo", *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def processes_of_run(run_id: str) -> list[int]:
    """Live processes whose environment carries this demo run's marker."""
    marker = f"{RUN_MARKER_VAR}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def assert_nothing_left(output: str, wait_s: float = 5) -> None:
    match = BATCH.search(output)
    assert match, output
    # redis-server rewrites its process title over its environment, so the marker cannot find
    # it: its port must be closed instead.
    broker = BROKER.search(output)
    assert broker, output
    deadline = time.monotonic() + wait_s
    while (left := processes_of_run(match["run"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes left behind by the demo: {left}"
    while port_open(int(broker["port"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open(int(broker["port"])), "the demo's broker still listens"


def summary(output: str) -> dict[str, int]:
    match = SUMMARY.search(output)
    assert match, output
    return {k: int(v) for k, v in match.groupdict().items()}


# ------------------------------------------------------------------------- the demo command


@needs_proc
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
def test_demo_with_redis_server(tmp_path: Path) -> None:
    done = run_demo_cli(["--broker", "redis-server"], cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # 12 cards: 10 specimens, 1 photo that is no ID card, 1 GIF refused at submit.
    assert summary(out) == {"succeeded": 10, "failed": 1, "refused": 1, "cards": 12}
    assert "all as expected" in out
    assert "broker: redis-server" in out
    assert "gif_not_supported" in out  # the refusal is shown with its rule
    assert "FailedOperation.ImageNoSpecifiedCard" in out
    assert "永久有效" in out  # the card without expiry shows the card's own text
    assert_nothing_left(out)
    # Without --keep the SQLite file and logs are gone, and nothing was written to the cwd.
    database = DATABASE.search(out)
    assert database and not Path(database["path"]).exists()
    assert list(tmp_path.iterdir()) == []


@needs_proc
def test_demo_with_fakeredis_broker_and_keep(tmp_path: Path) -> None:
    done = run_demo_cli(["--broker", "fakeredis", "--jobs", "6", "--keep"], cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "broker: fakeredis" in out
    assert summary(out) == {"succeeded": 4, "failed": 1, "refused": 1, "cards": 6}
    assert_nothing_left(out)

    kept = list(tmp_path.glob(".macao-ocr/demo-*/demo.db"))
    assert len(kept) == 1, out
    truth = {c.label: c.truth for c in specimen_cards(6) if c.truth is not None}
    engine = sa.create_engine(f"sqlite:///{kept[0]}")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select job.tag, job.status, result.id_number, result.en_last_name "
                "from job left join result on result.job_id = job.id"
            )
        ).all()
    engine.dispose()
    by_tag = {row.tag: row for row in rows}
    assert set(by_tag) == {*truth, "not-a-card.jpg"}  # the refused GIF never became a job
    for label, fields in truth.items():
        assert by_tag[label].status == "succeeded"
        # Kept encrypted under the demo's own keys (never printed): no plaintext in the file.
        assert by_tag[label].id_number is not None
        assert fields["ID"].encode() not in bytes(by_tag[label].id_number)
        assert fields["EnLastName"].encode() not in bytes(by_tag[label].en_last_name)
    assert by_tag["not-a-card.jpg"].status == "failed"


def start_demo_until_submitted(cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """A demo slow enough (30 cards at 2 calls/s) that a signal after submit lands mid-run."""
    proc = subprocess.Popen(
        [str(MACAO_OCR), "demo", "--jobs", "30", "--qps", "2"],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "submitted" in line or time.monotonic() > deadline:
            break
    if not any("submitted" in line for line in lines):
        proc.kill()
        proc.wait()
        pytest.fail("the demo did not reach submit:\n" + "".join(lines))
    return proc, lines


@needs_proc
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc, lines = start_demo_until_submitted(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert "demo:" not in out  # it did not pretend to finish
    assert_nothing_left(out)
    database = DATABASE.search(out)
    assert database and not Path(database["path"]).exists()


@needs_proc
def test_children_die_with_a_killed_demo(tmp_path: Path) -> None:
    # SIGKILL gives the demo no chance to clean up: its children must notice by themselves.
    proc, lines = start_demo_until_submitted(tmp_path)
    proc.kill()
    proc.wait()
    assert_nothing_left("".join(lines), wait_s=30)


def test_real_service_mode_requires_images() -> None:
    result = CliRunner().invoke(
        cli_app,
        ["demo"],
        env={
            "TENCENTCLOUD_SECRET_ID": "AKIDuser",
            "TENCENTCLOUD_SECRET_KEY": "user-key",
            "MACAO_OCR_API_ENDPOINT": None,
        },
    )
    assert result.exit_code == 2, result.output
    assert "real" in result.output and "arguments" in result.output


def test_images_without_credentials_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "card.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    result = CliRunner().invoke(
        cli_app,
        ["demo", str(image)],
        env={"TENCENTCLOUD_SECRET_ID": None, "TENCENTCLOUD_SECRET_KEY": None},
    )
    assert result.exit_code == 2, result.output
    assert "TENCENTCLOUD_SECRET_ID" in result.output


# ------------------------------------------------------------------- planning and wiring


def test_mode_follows_the_users_credentials() -> None:
    assert wants_real_service({"TENCENTCLOUD_SECRET_ID": "AKIDx"})
    assert not wants_real_service({})
    # An endpoint override means the user points somewhere else (their own emulator, say).
    assert not wants_real_service(
        {"TENCENTCLOUD_SECRET_ID": "AKIDx", "MACAO_OCR_API_ENDPOINT": "http://127.0.0.1:9"}
    )


def _plan(**overrides: object) -> DemoPlan:
    values: dict[str, object] = dict(
        real_service=False, jobs=12, qps=5.0, broker="auto", concurrency=4, timeout_s=60,
        keep=False,
    )  # fmt: skip
    values.update(overrides)
    return DemoPlan(**values)  # type: ignore[arg-type]


def test_check_plan(tmp_path: Path) -> None:
    check_plan(_plan(), {})
    with pytest.raises(DemoError, match="TENCENTCLOUD_SECRET_KEY"):
        check_plan(
            _plan(real_service=True, images=(tmp_path,)), {"TENCENTCLOUD_SECRET_ID": "AKIDx"}
        )
    with pytest.raises(DemoError, match="not found"):
        check_plan(
            _plan(real_service=True, images=(tmp_path / "missing.jpg",)),
            {"TENCENTCLOUD_SECRET_ID": "AKIDx", "TENCENTCLOUD_SECRET_KEY": "k"},
        )
    with pytest.raises(DemoError, match="--qps"):
        check_plan(_plan(qps=-1.0), {})


USER_ENV = {
    "MACAO_OCR_REDIS_URL": "redis://users-redis:6379/3",
    "MACAO_OCR_DATABASE_URL": "postgresql://users-db/prod",
    "MACAO_OCR_API_REGION": "ap-hongkong",
    "TENCENTCLOUD_SECRET_ID": "AKIDuser",
    "TENCENTCLOUD_SECRET_KEY": "users-key",
    "PATH": "/usr/bin",
}


def test_emulator_mode_never_uses_the_users_services_or_credentials() -> None:
    env = demo_environment(
        USER_ENV, real_service=False, database_url="sqlite:////tmp/x/demo.db",
        broker_url="redis://127.0.0.1:7000/0", qps=5, concurrency=4, run_id="r1",
        emulator_url="http://127.0.0.1:7001", credential=("AKIDdemo", "demo-key"),
    )  # fmt: skip
    assert env["PATH"] == "/usr/bin"
    assert env["MACAO_OCR_REDIS_URL"] == env["MACAO_OCR_BROKER_URL"] == "redis://127.0.0.1:7000/0"
    assert env["MACAO_OCR_DATABASE_URL"] == "sqlite:////tmp/x/demo.db"
    assert env["TENCENTCLOUD_SECRET_ID"] == "AKIDdemo"
    assert env["MACAO_OCR_API_ENDPOINT"] == "http://127.0.0.1:7001"
    assert "MACAO_OCR_API_REGION" not in env
    assert "users" not in " ".join(env.values())
    settings = settings_from_env(env)
    assert settings.state_redis_url == "redis://127.0.0.1:7000/0"
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == "demo-key"


def test_real_mode_keeps_api_settings_but_private_storage() -> None:
    env = demo_environment(
        {**USER_ENV, "MACAO_OCR_API_ENDPOINT": "http://somewhere"}, real_service=True,
        database_url="sqlite:////tmp/x/demo.db", broker_url="redis://127.0.0.1:7000/0",
        qps=3, concurrency=4, run_id="r1",
    )  # fmt: skip
    assert env["TENCENTCLOUD_SECRET_ID"] == "AKIDuser"
    assert env["MACAO_OCR_API_REGION"] == "ap-hongkong"
    assert "MACAO_OCR_API_ENDPOINT" not in env  # the real service's default endpoint
    assert env["MACAO_OCR_REDIS_URL"] == "redis://127.0.0.1:7000/0"
    assert env["MACAO_OCR_DATABASE_URL"] == "sqlite:////tmp/x/demo.db"
    settings = settings_from_env(env)
    assert settings.api_endpoint == "https://ocr.intl.tencentcloudapi.com"
    assert settings.qps == 3.0


def test_specimen_cards_plan() -> None:
    cards = specimen_cards(12)
    assert [c.expect for c in cards].count("succeeded") == 10
    assert [c.expect for c in cards][-2:] == ["failed", "refused"]
    assert any(c.truth and c.truth.get("WarnCardInfos") for c in cards)
    assert len({c.truth["ID"] for c in cards if c.truth}) == 10
    assert [c.expect for c in specimen_cards(3)] == ["succeeded"] * 3
    with pytest.raises(DemoError):
        specimen_cards(0)


# --------------------------------------------------------------------- the embedded broker


@pytest.fixture
def fakeredis_broker() -> Iterator[str]:
    broker = start_broker("fakeredis")
    yield broker.url
    broker.stop()


def test_fakeredis_keeps_the_connection_after_an_error_reply(fakeredis_broker: str) -> None:
    client = redis.Redis.from_url(fakeredis_broker)
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha("0" * 40, 0)
    # Same pooled connection: a real Redis keeps it open, and so must the embedded one.
    assert client.set("k", "v") is True
    assert client.eval("return redis.call('GET', KEYS[1])", 1, "k") == b"v"
    client.close()


def test_limiter_script_runs_on_fakeredis(fakeredis_broker: str) -> None:
    from worker.quota.limiter_redis import RedisRateLimiter
    from worker.quota.state import state_redis

    async def reserve_three() -> list[float]:
        client = state_redis(fakeredis_broker)
        limiter = RedisRateLimiter(client, qps=5, burst=1)
        # Asked together, so the three run at nearly one instant of the Redis clock (asked
        # one after another, a slow machine's round trips ate into the spacing: seen in CI).
        reservations = await asyncio.gather(
            *(limiter.reserve("demo-key", max_wait_s=10) for _ in range(3))
        )
        await client.aclose()
        return sorted(r.wait_s for r in reservations)

    waits = asyncio.run(reserve_three())
    # Slots 1/5 s apart: the last of three waits about 0.4 s longer than the first.
    assert waits[2] - waits[0] > 0.3, waits


def test_fakeredis_stop_releases_the_port() -> None:
    broker = start_broker("fakeredis")
    port = int(broker.url.rsplit(":", 1)[1].split("/")[0])
    broker.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
def test_redis_server_broker_keeps_nothing_on_disk_and_stops() -> None:
    broker = start_broker("redis-server")
    pid = broker.pid  # type: ignore[attr-defined]
    client = redis.Redis.from_url(broker.url)
    try:
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert str(client.config_get("bind")["bind"]).startswith("127.0.0.1")
    finally:
        client.close()
        broker.stop()
    assert not Path(f"/proc/{pid}").exists()


def test_unknown_broker_kind() -> None:
    with pytest.raises(BrokerError, match="fakeredis"):
        start_broker("memcached")
