# ruff: noqa: F811 -- the pipeline tests' fixtures are imported by name, then used
"""DownLoadError's own budget, and the URL fallback: our own pinned, checked fetch, sent
inline once (a local HTTP server plays the user's image host)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from models import Job, JobEvent, JobStatus
from models.base import utcnow
from tests.integration.test_pipeline import (  # noqa: F401 -- fixtures
    Harness,
    harness,
    loop_thread,
    settings,
    transient,
)
from worker.errors import InputError, TransientError
from worker.netpolicy import UrlPolicy
from worker.pipeline import Outcome
from worker.tencent.fetch import fetch_image
from worker.tencent.validation import validate_request

DOWNLOAD = "FailedOperation.DownLoadError"


def card_jpeg() -> bytes:
    buffer = io.BytesIO()
    PILImage.effect_noise((320, 220), 40).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


CARD = card_jpeg()


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        status, headers, body = self.routes.get(self.path.split("?")[0], (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def image_host() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.seen = []
    _Handler.routes = {
        "/card.jpg": (200, {"Content-Type": "image/jpeg"}, CARD),
        "/half.jpg": (200, {}, CARD[: len(CARD) // 2]),
        "/thumb.jpg": (200, {}, _thumb()),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
        "/to-private": (302, {"Location": "http://10.0.0.5/card.jpg"}, b""),
        "/to-card": (302, {"Location": "/card.jpg"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.jpg": (200, {}, b"\xff\xd8\xff" + b"\0" * (6 * 1024 * 1024)),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()
    server.server_close()


def _thumb() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def download_error() -> TransientError:
    return transient(DOWNLOAD)


def configure(h: Harness, **values: object) -> None:
    settings = h.deps.settings.model_copy(update={"max_attempts": 6, **values})
    # As worker.runtime builds it: the URL policy follows the settings.
    policy = UrlPolicy(allow_loopback=settings.url_allow_loopback)
    h.deps = replace(h.deps, settings=settings, validate=partial(validate_request, policy=policy))


def run_until_done(h: Harness, job_id: object, runs: int = 10) -> Outcome:
    outcome = Outcome.not_claimed
    for _ in range(runs):
        outcome = h.run(job_id)  # type: ignore[arg-type]
        if outcome is not Outcome.retrying:
            return outcome
        with h.sessions() as session, session.begin():
            job = session.get(Job, job_id)
            assert job is not None
            job.next_attempt_at = utcnow() - timedelta(seconds=1)
    return outcome


def events(h: Harness, job_id: object) -> list[JobEvent]:
    with h.sessions() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)))
        session.expunge_all()
        return rows


# -- the budget


def test_download_error_has_a_budget_of_its_own(harness: Harness) -> None:
    configure(harness, download_max_attempts=3)
    job_id = harness.add_job()
    harness.client.script = [download_error() for _ in range(10)]
    assert run_until_done(harness, job_id) is Outcome.failed
    assert len(harness.client.calls) == 3  # not max_attempts (6)
    job = harness.job(job_id)
    assert job.status is JobStatus.failed and job.last_error_code == DOWNLOAD_ERROR_CODE
    assert events(harness, job_id) == []


DOWNLOAD_ERROR_CODE = DOWNLOAD


def test_other_errors_keep_the_general_budget(harness: Harness) -> None:
    configure(harness, download_max_attempts=3)
    job_id = harness.add_job()
    harness.client.script = [transient() for _ in range(10)]
    assert run_until_done(harness, job_id) is Outcome.failed
    assert len(harness.client.calls) == 6


# -- the fallback


def test_fallback_fetches_and_sends_inline_once(harness: Harness, image_host: str) -> None:
    configure(harness, download_max_attempts=3, url_fallback=True, url_allow_loopback=True)
    job_id = harness.add_job(front_url=f"{image_host}/card.jpg?token=SECRET")
    harness.client.script = [download_error(), download_error(), download_error()]
    assert run_until_done(harness, job_id) is Outcome.succeeded
    calls = harness.client.calls
    assert len(calls) == 4
    assert all(c.front is not None and c.front.url is not None for c in calls[:3])
    assert calls[3].front is not None and calls[3].front.url is None
    assert calls[3].front.data == CARD
    assert [a.outcome_code for a in harness.attempts(job_id)] == [DOWNLOAD] * 3 + ["OK"]
    [event] = events(harness, job_id)
    assert event.kind == "url_fallback"
    assert "SECRET" not in (event.reason or "") and "127.0.0.1" not in (event.reason or "")
    assert harness.job(job_id).status is JobStatus.succeeded


def test_fallback_is_off_by_default(harness: Harness, image_host: str) -> None:
    configure(harness, download_max_attempts=3, url_allow_loopback=True)
    job_id = harness.add_job(front_url=f"{image_host}/card.jpg")
    harness.client.script = [download_error() for _ in range(5)]
    assert run_until_done(harness, job_id) is Outcome.failed
    assert len(harness.client.calls) == 3
    assert _Handler.seen == []


def test_fallback_is_used_once(harness: Harness, image_host: str) -> None:
    configure(harness, download_max_attempts=3, url_fallback=True, url_allow_loopback=True)
    job_id = harness.add_job(front_url=f"{image_host}/card.jpg")
    harness.client.script = [download_error() for _ in range(10)]
    assert run_until_done(harness, job_id) is Outcome.failed
    assert len(harness.client.calls) == 4
    assert len(events(harness, job_id)) == 1


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/to-metadata", "metadata_address"),
        ("/to-private", "private_address"),
        ("/half.jpg", "image_undecodable"),
        ("/thumb.jpg", "image_too_small"),
        ("/loop", "fetch_redirects"),
        ("/missing.jpg", "fetch_failed"),
    ],
)
def test_refused_fallback_fails_the_job_without_a_fourth_call(
    harness: Harness, image_host: str, path: str, rule: str
) -> None:
    configure(harness, download_max_attempts=3, url_fallback=True, url_allow_loopback=True)
    job_id = harness.add_job(front_url=f"{image_host}{path}")
    harness.client.script = [download_error() for _ in range(5)]
    assert run_until_done(harness, job_id) is Outcome.failed
    assert len(harness.client.calls) == 3
    job = harness.job(job_id)
    assert job.last_error_code == DOWNLOAD
    assert f"rule {rule}" in (job.last_error_message or "")
    assert "169.254" not in (job.last_error_message or "")


# -- the fetch itself


def _fetch(url: str, **kwargs: object) -> bytes:
    options: dict[str, object] = {"policy": UrlPolicy(allow_loopback=True), "timeout_s": 5.0}
    options.update(kwargs)
    return asyncio.run(fetch_image(url, "front", **options))  # type: ignore[arg-type]


def test_fetch_follows_a_public_redirect(image_host: str) -> None:
    assert _fetch(f"{image_host}/to-card") == CARD
    assert _Handler.seen == ["/to-card", "/card.jpg"]


def test_fetch_refuses_a_redirect_to_a_private_address(image_host: str) -> None:
    with pytest.raises(InputError) as info:
        _fetch(f"{image_host}/to-metadata")
    assert info.value.rule == "metadata_address"


def test_fetch_refuses_loopback_without_the_test_setting(image_host: str) -> None:
    with pytest.raises(InputError) as info:
        _fetch(f"{image_host}/card.jpg", policy=UrlPolicy())
    assert info.value.rule == "loopback_address"
    assert _Handler.seen == []


def test_fetch_caps_the_size(image_host: str) -> None:
    with pytest.raises(InputError) as info:
        _fetch(f"{image_host}/big.jpg", max_bytes=1024 * 1024)
    assert info.value.rule == "fetch_too_large"
