"""Pre-flight and the DownLoadError path with real processes: `macao-ocr submit`, a real
Celery worker, the emulator (its counters are the witness of how many calls were bought)."""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from emulator.specimen import make_specimen
from models import Attempt, JobEvent, JobStatus
from tests.fixtures.workers import StartWorkers
from tests.integration.test_pipeline_e2e import db, run_cli, wait_terminal, write_cards

__all__ = ["db"]  # the fixture, imported by name

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DOWNLOAD = "FailedOperation.DownLoadError"
BAD_URLS = [
    ("http://169.254.169.254/latest/meta-data", "metadata_address"),
    ("http://127.0.0.1:6379/", "loopback_address"),
    ("http://10.0.0.5/", "private_address"),
    ("http://0x7f000001/", "loopback_address"),
    ("http://2130706433/", "loopback_address"),
    ("http://0177.0.0.1/", "loopback_address"),
    ("http://[::ffff:127.0.0.1]/", "loopback_address"),
    ("http://100.64.0.1/", "cgnat_address"),
    ("http://localhost/card.jpg", "loopback_address"),
    ("https://cards.example.com/" + "x" * 5000, "url_too_long"),
    ("http://user:pw@cards.example.com/card.jpg", "url_credentials"),
]


def test_refused_input_buys_no_call(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    tmp_path: Path,
) -> None:
    celery_workers(worker_env, n=1, concurrency=5)
    for url, rule in BAD_URLS:
        proc = run_cli(worker_env, "submit", url, "--json")
        assert proc.returncode != 0, url
        assert f"rule {rule}" in proc.stderr, proc.stderr
        assert "meta-data" not in proc.stderr and "pw@" not in proc.stderr

    [good] = write_cards(tmp_path / "ok", 1, seed=91)
    data = good.path.read_bytes()
    half = tmp_path / "half.jpg"
    half.write_bytes(data[: len(data) // 2])
    thumb = tmp_path / "thumb.jpg"
    PILImage.new("RGB", (8, 8)).save(thumb, format="JPEG")
    for args, rule in (
        ([str(half)], "image_undecodable"),
        ([str(thumb)], "image_too_small"),
        (["--back", str(good.path)], "no_front"),
        (["/dev/zero"], "not_a_regular_file"),
    ):
        proc = run_cli(worker_env, "submit", *args, "--json")
        assert proc.returncode != 0
        assert rule in proc.stderr, proc.stderr

    with Session(db) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Attempt)) == 0
    assert emulator.counters()["total"] == 0

    # Control: a good card goes through this very worker, so the silence was not a dead one.
    proc = run_cli(worker_env, "submit", str(good.path), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = uuid.UUID(json.loads(proc.stdout.splitlines()[0])["job_id"])
    [job] = wait_terminal(db, [job_id], timeout_s=60)
    assert job.status is JobStatus.succeeded
    assert emulator.counters()["total"] == 1


def test_download_error_budget_is_three_calls(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
) -> None:
    emulator.configure(url_download_error=1.0)
    celery_workers(worker_env, n=1, concurrency=5)
    # .invalid never resolves: accepted at submit (Tencent resolves a URL, not us).
    proc = run_cli(worker_env, "submit", "https://cards.invalid/card.jpg?sig=abc", "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = uuid.UUID(json.loads(proc.stdout.splitlines()[0])["job_id"])
    [job] = wait_terminal(db, [job_id], timeout_s=90)
    assert job.status is JobStatus.failed and job.last_error_code == DOWNLOAD
    counters = emulator.counters()
    assert counters["total"] == 3 and counters["by_code"] == {DOWNLOAD: 3}


class _ImageHost(BaseHTTPRequestHandler):
    image = b""
    gets: list[str] = []

    def do_GET(self) -> None:
        self.gets.append(self.path.split("?")[0])
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def image_host() -> Iterator[str]:
    _ImageHost.image = make_specimen(5).image
    _ImageHost.gets = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_fallback_sends_the_image_inline_on_the_fourth_call(
    worker_env: dict[str, str],
    celery_workers: StartWorkers,
    emulator: Any,
    db: sa.Engine,
    image_host: str,
) -> None:
    env = {
        **worker_env,
        "MACAO_OCR_URL_FALLBACK": "true",
        # Tests only: the image host listens on loopback.
        "MACAO_OCR_URL_ALLOW_LOOPBACK": "true",
    }
    emulator.configure(url_download_error=1.0)  # only calls carrying a URL fail
    workers = celery_workers(env, n=1, concurrency=5)
    proc = run_cli(env, "submit", f"{image_host}/card.jpg?token=SECRET123", "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = uuid.UUID(json.loads(proc.stdout.splitlines()[0])["job_id"])
    [job] = wait_terminal(db, [job_id], timeout_s=90)
    assert job.status is JobStatus.succeeded, workers.log_text()[-4000:]
    counters = emulator.counters()
    assert counters["total"] == 4
    assert counters["by_code"] == {DOWNLOAD: 3, "OK": 1}
    # The emulator never downloaded it (the knob answers first): the worker fetched it.
    assert _ImageHost.gets == ["/card.jpg"]
    with Session(db) as session:
        codes = session.scalars(
            sa.select(Attempt.outcome_code).where(Attempt.job_id == job_id).order_by(Attempt.number)
        ).all()
        kinds = session.scalars(sa.select(JobEvent.kind).where(JobEvent.job_id == job_id)).all()
    assert codes == [DOWNLOAD, DOWNLOAD, DOWNLOAD, "OK"]
    assert kinds == ["url_fallback"]
    assert "SECRET123" not in workers.log_text()


def test_emulator_url_download_error_knob_spares_inline_images(emulator: Any) -> None:
    # The knob the tests above rely on: URL calls fail, base64 calls do not.
    import base64
    import urllib.request

    from tests.fixtures.emulator import tc3_headers

    emulator.configure(url_download_error=1.0)
    image = io.BytesIO(make_specimen(3).image).getvalue()
    codes = []
    for payload in (
        {"ImageUrl": "https://cards.invalid/a.jpg"},
        {"ImageBase64": base64.b64encode(image).decode()},
    ):
        body = json.dumps(payload).encode()
        headers = tc3_headers(
            secret_id=emulator.secret_id,
            secret_key=emulator.secret_key,
            host=emulator.host,
            body=body,
        )
        request = urllib.request.Request(emulator.url + "/", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer = json.loads(resp.read())["Response"]
        codes.append(answer.get("Error", {}).get("Code", "OK"))
    assert codes == [DOWNLOAD, "OK"]
