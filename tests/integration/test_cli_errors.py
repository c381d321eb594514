"""The CLI's one error boundary: expected failures are one line (JSON under --json) and a
non-zero exit, `--debug` adds the traceback; `--version`; `worker` start-up checks; `health`."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from worker.cli import app

# A port nobody listens on: connections are refused at once.
REFUSED_REDIS = "redis://127.0.0.1:1/0"


# The CLI configures logging for its process; under CliRunner that process is ours.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def json_error(stream: str) -> dict[str, Any]:
    """The `{"error": ...}` object: the last line of stderr under --json."""
    body = json.loads(stream.splitlines()[-1])
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    return error


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env or {})


def one_error_line(result: Result) -> str:
    """The failure's whole stderr: exactly one line, `error: ...`."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    return lines[0]


def test_version() -> None:
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"macao-ocr {version('macao-ocr')}"


def test_specimen_into_a_missing_folder_is_one_line() -> None:
    result = run("specimen", "/no/such/dir/x.jpg")
    assert result.exit_code == 2
    assert "/no/such/dir/x.jpg: No such file or directory" in one_error_line(result)


def test_debug_shows_the_traceback() -> None:
    result = run("--debug", "specimen", "/no/such/dir/x.jpg")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "FileNotFoundError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: /no/such/dir/x.jpg")


def test_emulator_on_a_busy_port_is_one_line(busy_port: int) -> None:
    env = {"TENCENTCLOUD_SECRET_ID": "AKIDtest", "TENCENTCLOUD_SECRET_KEY": "k"}
    result = run("emulator", "--port", str(busy_port), env=env)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "port busy" in line and str(busy_port) in line


@pytest.mark.parametrize("command", [["jobs"], ["status", "x"], ["stats"], ["health"]])
def test_postgres_scheme_is_one_line_naming_the_variable(command: list[str]) -> None:
    result = run(*command, env={"MACAO_OCR_DATABASE_URL": "postgres://u@127.0.0.1/db"})
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "MACAO_OCR_DATABASE_URL" in line and "postgresql://" in line
    assert "u@127.0.0.1" not in line  # never echo the value (it may hold a password)


def test_errors_are_json_under_json() -> None:
    result = run("jobs", "--json", env={"MACAO_OCR_DATABASE_URL": "postgres://u@h/db"})
    assert result.exit_code == 2
    assert result.stdout == ""  # results only
    error = json_error(result.stderr)
    assert error["code"] == "config"
    assert "MACAO_OCR_DATABASE_URL" in error["message"]
    assert error["exit_code"] == 2


def test_unreachable_database_is_one_line() -> None:
    env = {"MACAO_OCR_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}
    result = run("jobs", env=env)
    assert result.exit_code == 1
    assert "database unreachable" in one_error_line(result)
    as_json = run("jobs", "--json", env=env)
    assert json_error(as_json.stderr)["code"] == "database_unreachable"


def test_submit_on_an_unmigrated_database_says_to_upgrade(tmp_path: Path) -> None:
    from emulator.specimen import make_specimen

    card = tmp_path / "card.jpg"
    card.write_bytes(make_specimen(seed=1).image)
    env = {
        "MACAO_OCR_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "MACAO_OCR_BROKER_URL": REFUSED_REDIS,
    }
    result = run("submit", str(card), env=env)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "not migrated" in line and "macao-ocr db upgrade" in line
    as_json = run("submit", str(card), "--json", env=env)
    assert json_error(as_json.stderr)["code"] == "database_not_migrated"


def test_submit_refused_input_is_json_under_json(tmp_path: Path) -> None:
    (tmp_path / "not-an-image.jpg").write_bytes(b"hello")
    env = {"MACAO_OCR_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    result = run("submit", str(tmp_path / "not-an-image.jpg"), "--json", env=env)
    assert result.exit_code == 2
    error = json_error(result.stderr)
    assert str(error["code"]).startswith("Input.")


# -- start-up checks and health


def test_worker_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    env = {
        "MACAO_OCR_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "MACAO_OCR_BROKER_URL": REFUSED_REDIS,
        "MACAO_OCR_METRICS_PORT": "0",
    }
    result = run("worker", env=env)
    assert result.exit_code == 2  # missing credentials: a configuration error
    line = one_error_line(result)
    # Every wrong part named, with what to do.
    assert "database: FAILED: not migrated" in line and "macao-ocr db upgrade" in line
    assert "redis: FAILED: unreachable" in line and "MACAO_OCR_REDIS_URL" in line
    assert "broker: FAILED: unreachable" in line and "MACAO_OCR_BROKER_URL" in line
    assert "credentials: FAILED: missing TENCENTCLOUD_SECRET_ID" in line
    # Nothing started: the launcher's first word would have been a worker_started line.
    assert "worker_started" not in result.output


def test_worker_refuses_to_start_on_an_unreachable_database() -> None:
    env = {
        "MACAO_OCR_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing",
        "MACAO_OCR_BROKER_URL": REFUSED_REDIS,
        "TENCENTCLOUD_SECRET_ID": "AKIDtest",
        "TENCENTCLOUD_SECRET_KEY": "k",
        "MACAO_OCR_METRICS_PORT": "0",
    }
    result = run("worker", env=env)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "database: FAILED: unreachable" in line and "MACAO_OCR_DATABASE_URL" in line
    assert "credentials" not in line  # set: not named


def test_health_passes_on_a_migrated_database_and_live_redis(
    fresh_migrated_database: Callable[[], str], clean_redis: str
) -> None:
    env = {"MACAO_OCR_DATABASE_URL": fresh_migrated_database(), "MACAO_OCR_BROKER_URL": clean_redis}
    result = run("health", "--json", env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["healthy"] is True
    assert {c["name"]: c["ok"] for c in body["checks"]} == {
        "database": True,
        "redis": True,
        "broker": True,
    }
    human = run("health", env=env)
    assert human.exit_code == 0
    assert "database: ok" in human.stdout


def test_health_names_the_failed_part(clean_redis: str, tmp_path: Path) -> None:
    env = {
        "MACAO_OCR_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "MACAO_OCR_BROKER_URL": clean_redis,
    }
    result = run("health", "--json", env=env)
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["database"]["ok"] is False
    assert "macao-ocr db upgrade" in checks["database"]["fix"]
    assert checks["redis"]["ok"] is True and checks["broker"]["ok"] is True

    env["MACAO_OCR_REDIS_URL"] = REFUSED_REDIS
    result = run("health", env=env)
    assert result.exit_code == 1
    assert "redis: FAILED" in result.stderr and "MACAO_OCR_REDIS_URL" in result.stderr


def test_health_fails_on_a_database_behind_head(
    fresh_migrated_database: Callable[[], str], clean_redis: str
) -> None:
    import migrations

    url = fresh_migrated_database()
    migrations.downgrade(url, "0001")
    env = {"MACAO_OCR_DATABASE_URL": url, "MACAO_OCR_BROKER_URL": clean_redis}
    result = run("health", "--json", env=env)
    assert result.exit_code == 1
    database = json.loads(result.stdout)["checks"][0]
    assert database["name"] == "database" and not database["ok"]
    assert "0001" in database["detail"]


def test_interactive_commands_print_no_json_log_lines(tmp_path: Path) -> None:
    """submit logs INFO events (job_submitted...); a person sees only the ids."""
    import migrations
    from emulator.specimen import make_specimen

    db = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(db)
    card = tmp_path / "card.jpg"
    card.write_bytes(make_specimen(seed=2).image)
    env = {"MACAO_OCR_DATABASE_URL": db, "MACAO_OCR_BROKER_URL": REFUSED_REDIS}
    quiet = run("submit", str(card), env=env)
    assert quiet.exit_code == 0, quiet.output
    assert '{"' not in quiet.stderr
    # Asked for: the configured JSON logging comes back.
    loud = run("--log-json", "submit", str(card), env={**env, "MACAO_OCR_LOG_LEVEL": "INFO"})
    assert loud.exit_code == 0, loud.output
    assert any(line.startswith('{"') for line in loud.stderr.splitlines()), loud.stderr


def test_python_m_entry_point_uses_the_boundary() -> None:
    """The console script's own argv is what the boundary reads (--json after the command)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "jobs", "--json"],
        env={"MACAO_OCR_DATABASE_URL": "postgres://x@h/db", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert json_error(done.stderr.decode())["code"] == "config"
