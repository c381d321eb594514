"""Flower against real processes: authentication required, task views show the job id only.

A real Flower, a real worker, the emulator, real Redis and PostgreSQL. The broker message is
read straight from Redis before any worker takes it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from emulator.specimen import Specimen, make_specimen
from tests.fixtures.workers import StartWorkers, cli_env, wait_terminal
from worker.broker.publish import QUEUE, TASK_NAME
from worker.cli.ops_cmd import flower_command
from worker.settings import Settings

pytestmark = pytest.mark.integration

MACAO_OCR = str(Path(sys.executable).parent / "macao-ocr")
USER, PASSWORD = "ops", "flower-test-pw"
N_JOBS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class FlowerProcess:
    def __init__(self, argv: list[str], env: Mapping[str, str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 45.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"flower exited:\n{self.log.read_text()[-3000:]}", pytrace=False)
            try:
                http_get(self.url + "/healthcheck")
                return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"flower not ready:\n{self.log.read_text()[-3000:]}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def start_flower(tmp_path: Path) -> Iterator[Callable[..., FlowerProcess]]:
    started: list[FlowerProcess] = []

    def start(argv: list[str], env: Mapping[str, str], port: int) -> FlowerProcess:
        flower = FlowerProcess(argv, env, port, tmp_path / f"flower-{len(started)}.log")
        started.append(flower)
        flower.wait_ready()
        return flower

    yield start
    for flower in started:
        flower.stop()


def submit(env: Mapping[str, str], tmp_path: Path, images: list[bytes]) -> list[str]:
    rows = ["front"]
    for i, data in enumerate(images):
        path = tmp_path / f"card-{i}.jpg"
        path.write_bytes(data)
        rows.append(path.name)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    done = subprocess.run(
        [MACAO_OCR, "submit", "--manifest", str(manifest), "--json"],
        env=cli_env(env),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line)["job_id"] for line in done.stdout.decode().splitlines()]


def personal_strings(specimen: Specimen) -> list[str]:
    truth = specimen.truth
    return [
        truth["ID"],
        truth["ID"].replace("(", "").replace(")", ""),
        truth["Birthday"],
        truth["CnLastName"] + truth["CnFirstName"],
        f"{truth['EnLastName']} {truth['EnFirstName']}",
        base64.b64encode(specimen.image[:300]).decode()[:60],
    ]


def test_flower_requires_auth_and_shows_only_job_ids(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    start_flower: Callable[..., FlowerProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    flower = start_flower(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
        cli_env(worker_env), port,
    )  # fmt: skip

    specimens = [make_specimen(seed=600 + i) for i in range(N_JOBS)]
    job_ids = submit(worker_env, tmp_path, [s.image for s in specimens])
    assert len(job_ids) == N_JOBS

    # The broker holds exactly what we meant to send, before any worker takes it.
    client = redis.Redis.from_url(worker_env["MACAO_OCR_BROKER_URL"])
    raw_messages = client.lrange(QUEUE, 0, -1)
    assert len(raw_messages) == N_JOBS
    seen_args = []
    for raw in raw_messages:
        message = json.loads(raw)
        headers = message["headers"]
        assert headers["task"] == TASK_NAME
        body = json.loads(base64.b64decode(message["body"]))
        args, kwargs, _embed = body
        assert kwargs == {}
        assert len(args) == 1
        seen_args.append(args[0])
        assert headers["argsrepr"] == repr(args)
        assert headers["kwargsrepr"] == "{}"
        text = raw.decode() if isinstance(raw, bytes) else raw
        for specimen in specimens:
            for value in personal_strings(specimen):
                assert value not in text
    assert sorted(seen_args) == sorted(job_ids)

    celery_workers(worker_env, n=1, concurrency=4)
    statuses = wait_terminal(worker_env["MACAO_OCR_DATABASE_URL"], job_ids)
    assert set(statuses.values()) == {"succeeded"}

    # Flower saw every task succeed, and shows the job id as the only argument.
    deadline = time.monotonic() + 30
    while True:
        status, payload = http_get(f"{flower.url}/api/tasks?limit=100", auth=(USER, PASSWORD))
        assert status == 200, payload[:200]
        tasks: dict[str, Any] = json.loads(payload)
        ours = [t for t in tasks.values() if t.get("name") == TASK_NAME]
        if len(ours) == N_JOBS and all(t["state"] == "SUCCESS" for t in ours):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"flower tasks: {[(t.get('name'), t['state']) for t in ours]}")
        time.sleep(0.5)
    assert sorted(t["args"] for t in ours) == sorted(repr([j]) for j in job_ids)
    assert all(t["kwargs"] == "{}" for t in ours)
    for task_id in tasks:
        status, detail = http_get(f"{flower.url}/api/task/info/{task_id}", auth=(USER, PASSWORD))
        assert status == 200
        text = detail.decode()
        for specimen in specimens:
            for value in personal_strings(specimen):
                assert value not in text

    # Without credentials, or with wrong ones, Flower refuses: API and UI alike.
    assert http_get(f"{flower.url}/api/tasks")[0] == 401
    assert http_get(f"{flower.url}/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert http_get(f"{flower.url}/")[0] == 401
    assert http_get(f"{flower.url}/tasks")[0] == 401


def test_macao_ocr_flower_refuses_without_password(worker_env: dict[str, str]) -> None:
    done = subprocess.run(
        [MACAO_OCR, "flower", "--port", str(free_port())],
        env=cli_env(worker_env),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MACAO_OCR_FLOWER_PASSWORD" in done.stderr.decode()


def test_macao_ocr_flower_serves_with_auth(
    worker_env: dict[str, str], start_flower: Callable[..., FlowerProcess]
) -> None:
    port = free_port()
    env = cli_env(worker_env) | {
        "MACAO_OCR_FLOWER_USER": USER,
        "MACAO_OCR_FLOWER_PASSWORD": PASSWORD,
    }
    flower = start_flower(
        [MACAO_OCR, "flower", "--port", str(port), "--address", "127.0.0.1"], env, port
    )
    assert http_get(f"{flower.url}/api/workers")[0] == 401
    assert http_get(f"{flower.url}/")[0] == 401
    assert http_get(f"{flower.url}/api/workers", auth=(USER, PASSWORD))[0] == 200
    assert http_get(f"{flower.url}/", auth=(USER, PASSWORD))[0] == 200
    # The password is not on Flower's command line, where `ps` would show it.
    cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert PASSWORD not in cmdline and "flower" in cmdline


def test_flower_command_keeps_what_the_user_set() -> None:
    settings = Settings(flower_user="admin", flower_password="ours", flower_port=5601)
    argv, env = flower_command(settings, {})
    assert env["FLOWER_BASIC_AUTH"] == "admin:ours"
    assert "--port=5601" in argv
    assert not any("ours" in a for a in argv)

    # Flower's own variables win over ours.
    argv, env = flower_command(settings, {"FLOWER_BASIC_AUTH": "x:y", "FLOWER_PORT": "7000"})
    assert env["FLOWER_BASIC_AUTH"] == "x:y"
    assert not any(a.startswith("--port") for a in argv)
    # ... unless the command line says otherwise.
    argv, _ = flower_command(settings, {"FLOWER_PORT": "7000"}, port=7100, address="127.0.0.1")
    assert "--port=7100" in argv and "--address=127.0.0.1" in argv
    # OAuth configured through Flower needs no password of ours.
    _, env = flower_command(Settings(flower_password=None), {"FLOWER_AUTH": ".*@example.com"})
    assert "FLOWER_BASIC_AUTH" not in env


def test_flower_command_refuses_bad_credentials() -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="MACAO_OCR_FLOWER_PASSWORD"):
        flower_command(Settings(flower_password=None), {})
    with pytest.raises(ConfigError, match="MACAO_OCR_FLOWER_PASSWORD"):
        flower_command(Settings(flower_password="a,b"), {})
    with pytest.raises(ConfigError, match="MACAO_OCR_FLOWER_USER"):
        flower_command(Settings(flower_user="a:b", flower_password="pw"), {})
