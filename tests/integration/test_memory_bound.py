# ruff: noqa: F811  (the harness fixtures are imported from test_pipeline)
"""The memory bound: image bytes a worker process holds are capped (jobs wait, never fail),
and the client refuses an answer over its size cap."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image as PILImage

from tests.fixtures.workers import sealer_for_tests
from tests.integration.test_pipeline import (  # noqa: F401  (fixtures)
    Harness,
    harness,
    loop_thread,
    settings,
)
from worker.errors import AnswerUndecodable, TransportError
from worker.membudget import ByteBudget, held_bytes, inline_max_bytes
from worker.pipeline import Outcome, process_job
from worker.settings import Settings
from worker.store.images import store_image
from worker.tencent.client import ClientConfig, OcrClient, make_session
from worker.tencent.types import ImageInput, OcrRequest

# -- the budget itself


def _in_thread(fn: Any) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def _until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_budget_waits_for_room_in_turn_and_lets_an_oversized_job_run_alone() -> None:
    budget = ByteBudget(100)
    budget.acquire(60)
    order: list[str] = []
    big = _in_thread(lambda: (budget.acquire(90), order.append("big")))  # type: ignore[func-returns-value]
    _until(lambda: budget.waiting == 1)
    # A small one arriving later would fit now, but waits behind the big one (no starvation).
    small = _in_thread(lambda: (budget.acquire(10), order.append("small")))  # type: ignore[func-returns-value]
    _until(lambda: budget.waiting == 2)
    time.sleep(0.1)
    assert order == [] and budget.used_bytes == 60
    budget.release(60)
    big.join(2)
    small.join(2)
    assert order == ["big", "small"] and budget.used_bytes == 100
    budget.release(100)

    # Larger than the cap: it runs when nothing else holds room, alone.
    budget.acquire(5)
    huge = _in_thread(lambda: budget.acquire(500))
    time.sleep(0.1)
    assert huge.is_alive()
    budget.release(5)
    huge.join(2)
    assert not huge.is_alive() and budget.used_bytes == 500


def test_wait_keeps_its_place_and_runs_on_wait() -> None:
    budget = ByteBudget(10)
    budget.acquire(10)
    ticks: list[float] = []
    waiter = _in_thread(lambda: budget.acquire(5, on_wait=lambda: ticks.append(1), tick_s=0.05))
    _until(lambda: len(ticks) >= 3)
    assert budget.waiting == 1
    budget.release(10)
    waiter.join(2)
    assert budget.used_bytes == 5


def test_held_bytes_counts_the_base64_twice_and_inline_fits_the_cap() -> None:
    assert held_bytes(3) == 3 + 2 * 4
    assert held_bytes(300_000) == 1_100_000
    for cap in (10_000, 1_000_000, 256 * 1024 * 1024):
        assert held_bytes(2 * inline_max_bytes(cap)) <= cap / 64
    assert inline_max_bytes(256 * 1024 * 1024) == 512 * 1024


# -- the pipeline waits for room


def _noise_png(n_bytes: int) -> bytes:
    side = int((n_bytes / 3) ** 0.5)
    buf = io.BytesIO()
    PILImage.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def test_a_job_waits_for_room_renewing_its_lease_then_reads_its_image(harness: Harness) -> None:
    data = _noise_png(140_000)
    budget = ByteBudget(held_bytes(150_000))
    assert len(data) > budget.inline_max_bytes  # read only once there is room
    reserve = held_bytes(2 * budget.inline_max_bytes)
    room = reserve + 1000  # the claim's reservation fits, the job's images do not
    assert held_bytes(len(data)) > room
    quick = harness.deps.settings.model_copy(update={"lease_s": 1.5})
    deps = dataclasses.replace(harness.deps, memory=budget, settings=quick)
    with harness.sessions() as session, session.begin():
        image = store_image(session, sealer_for_tests(), "default", data)
        session.flush()
        image_id = image.id
    job_id = harness.add_job(front_url=None, front_image_id=image_id)
    budget.acquire(budget.cap_bytes - room)  # other jobs' images fill the rest
    outcome: list[Outcome] = []
    runner = _in_thread(lambda: outcome.append(process_job(str(job_id), deps)))

    _until(lambda: budget.waiting == 1)
    first_lease = harness.job(job_id).lease_expires_at
    assert first_lease is not None
    time.sleep(1.2)
    assert harness.client.calls == [] and runner.is_alive()  # waiting, not failed
    renewed = harness.job(job_id).lease_expires_at
    assert renewed is not None and renewed > first_lease

    budget.release(budget.cap_bytes - room)
    runner.join(10)
    assert outcome == [Outcome.succeeded]
    [request] = harness.client.calls
    assert request.front is not None and request.front.data == data
    assert budget.used_bytes == 0  # all given back


def test_an_image_larger_than_the_cap_runs_alone(harness: Harness) -> None:
    data = _noise_png(50_000)
    budget = ByteBudget(10_000)
    deps = dataclasses.replace(harness.deps, memory=budget)
    with harness.sessions() as session, session.begin():
        image = store_image(session, sealer_for_tests(), "default", data)
        session.flush()
        image_id = image.id
    job_id = harness.add_job(front_url=None, front_image_id=image_id)
    assert process_job(str(job_id), deps) is Outcome.succeeded
    assert harness.client.calls[0].front is not None
    assert harness.client.calls[0].front.data == data
    assert budget.used_bytes == 0


# -- the client: response size cap, undecodable answers


SUCCESS = {"ID": "1234567(8)", "RequestId": "req-1"}


@pytest.fixture
async def server() -> AsyncIterator[tuple[dict[str, Any], str]]:
    state: dict[str, Any] = {"mode": "big", "hits": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        state["hits"] += 1
        if state["mode"] == "big":
            return web.json_response({"Response": {**SUCCESS, "RetImage": "A" * 300_000}})
        if state["mode"] == "big_chunked":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b'{"Response": {"RetImage": "')
            for _ in range(30):
                await resp.write(b"A" * 10_000)
            await resp.write(b'", "RequestId": "r"}}')
            await resp.write_eof()
            return resp
        if state["mode"] == "undecodable":
            # A 400-digit Angle: JSON, but no float can hold it.
            body = '{"Response": {"ID": "1234567(8)", "RequestId": "req-u", "Angle": 1%s}}'
            return web.Response(body=body % ("0" * 400), content_type="application/json")
        return web.json_response({"Response": SUCCESS})

    app = web.Application()
    app.router.add_post("/", handle)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield state, f"http://127.0.0.1:{test_server.port}"
    await test_server.close()


async def _recognize(endpoint: str, **extra: Any) -> Any:
    settings = Settings(
        api_endpoint=endpoint, secret_id="AKIDx", secret_key="k", total_timeout_s=5, **extra
    )
    session: aiohttp.ClientSession = make_session(settings)
    try:
        client = OcrClient(session, ClientConfig.from_settings(settings))
        png = _noise_png(300)
        return await client.recognize(OcrRequest(front=ImageInput(data=png)))
    finally:
        await session.close()


@pytest.mark.parametrize("mode", ["big", "big_chunked"])
async def test_an_answer_over_the_cap_is_refused_as_transient(
    server: tuple[dict[str, Any], str], mode: str
) -> None:
    state, endpoint = server
    state["mode"] = mode
    with pytest.raises(TransportError) as err:
        await _recognize(endpoint, max_response_bytes=100_000)
    assert err.value.code == "Transport.ResponseTooLarge" and err.value.retryable
    state["mode"] = "small"
    result = await _recognize(endpoint, max_response_bytes=100_000)
    assert result.id_number == "1234567(8)"
    assert Settings().max_response_bytes == 16 * 1024 * 1024


async def test_an_answer_the_parser_cannot_take_is_handed_back_whole(
    server: tuple[dict[str, Any], str],
) -> None:
    state, endpoint = server
    state["mode"] = "undecodable"
    with pytest.raises(AnswerUndecodable) as err:
        await _recognize(endpoint)
    assert err.value.code == "Internal.StoreFailed" and not err.value.retryable
    assert err.value.stage == "decode" and err.value.reason == "OverflowError"
    assert err.value.answer["RequestId"] == "req-u"
    assert "1234567" not in str(err.value) and "1234567" not in repr(err.value)
    assert state["hits"] == 1


def test_settings_defaults() -> None:
    settings = Settings()
    assert settings.max_inflight_bytes == 256 * 1024 * 1024
    assert settings.max_worker_lost == 3


@pytest.mark.parametrize("back", [None, "url", "data"])
@pytest.mark.parametrize("portrait", [False, True])
def test_encode_request_is_the_body_byte_for_byte(back: str | None, portrait: bool) -> None:
    from worker.tencent.client import encode_request
    from worker.tencent.validation import build_payload, encode_body

    back_side = {
        None: None,
        "url": ImageInput(url='https://cards.example/b\u00e9ck.jpg?x="1"'),
        "data": ImageInput(data=_noise_png(2000)),
    }[back]
    request = OcrRequest(front=ImageInput(data=_noise_png(5000)), back=back_side, portrait=portrait)
    assert encode_request(request) == encode_body(build_payload(request))


def test_large_buffers_go_back_to_the_os() -> None:
    from worker.membudget import return_large_buffers_to_os

    # glibc here (Linux CI): the threshold is pinned.
    assert return_large_buffers_to_os() is True
