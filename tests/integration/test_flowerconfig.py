"""Plain `celery -A worker flower` from the project root requires our login (flowerconfig.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "MACAO_OCR_"))}
    env.update(MACAO_OCR_BROKER_URL=redis_url, **extra)
    return env


def test_plain_celery_flower_requires_login(redis_url: str) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [CELERY, "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT,
        env=_env(redis_url, MACAO_OCR_FLOWER_PASSWORD="pw-for-test"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                code = _status(url)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("flower did not start")
                time.sleep(0.3)
        assert code == 401
        assert _status(url, "admin:wrong") == 401
        assert _status(url, "admin:pw-for-test") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_plain_celery_flower_refuses_to_start_without_password(redis_url: str) -> None:
    result = subprocess.run(
        [CELERY, "-A", "worker", "flower", f"--port={_free_port()}"],
        cwd=ROOT,
        env=_env(redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "MACAO_OCR_FLOWER_PASSWORD" in result.stderr + result.stdout
