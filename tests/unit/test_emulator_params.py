"""The emulator's parameter checks and its own image downloads (ImageUrl)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from emulator.specimen import make_specimen
from tests.fixtures.emulator import InProcessEmulator

SPEC_A = make_specimen(21)
SPEC_B = make_specimen(22, warnings=["glare"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain_image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 40), (10, 120, 200)).save(buf, fmt)
    return buf.getvalue()


def answer(result: tuple[int, Any]) -> dict[str, Any]:
    status, doc = result
    assert status == 200, doc
    resp: dict[str, Any] = doc["Response"]
    return resp


def code(result: tuple[int, Any]) -> str:
    resp = answer(result)
    return str(resp["Error"]["Code"]) if "Error" in resp else "OK"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"ImageBase64": ""}, "FailedOperation.EmptyImageError"),
        ({"ImageUrl": ""}, "FailedOperation.EmptyImageError"),
        ({"ImageBase64": "***not base64***"}, "FailedOperation.ImageDecodeFailed"),
        (
            {"ImageBase64": b64(b"just some text, not an image")},
            "FailedOperation.ImageDecodeFailed",
        ),
        ({}, "MissingParameter"),
        ({"BackImageBase64": b64(SPEC_A.image)}, "MissingParameter"),
        ({"ImageBase64": b64(SPEC_A.image), "Region": "ap-hongkong"}, "UnknownParameter"),
        ({"ImageBase64": 12345}, "InvalidParameter"),
        (
            {"ImageBase64": b64(SPEC_A.image), "Config": "not json"},
            "InvalidParameter.ConfigFormatError",
        ),
        (
            {"ImageBase64": b64(SPEC_A.image), "Config": '{"RetImage": "face"}'},
            "InvalidParameter.ConfigFormatError",
        ),
        (
            {"ImageBase64": b64(SPEC_A.image), "Config": '["RetImage"]'},
            "InvalidParameter.ConfigFormatError",
        ),
        (
            {"ImageBase64": b64(SPEC_A.image), "Config": {"RetImage": "portrait"}},
            "InvalidParameter",
        ),
        (
            {"ImageBase64": b64(SPEC_A.image), "BackImageBase64": "%%%"},
            "FailedOperation.ImageDecodeFailed",
        ),
        ({"ImageBase64": b64(plain_image("PNG"))}, "FailedOperation.ImageNoSpecifiedCard"),
        ({"ImageBase64": b64(plain_image("JPEG"))}, "FailedOperation.ImageNoSpecifiedCard"),
        ({"ImageBase64": b64(plain_image("BMP"))}, "FailedOperation.ImageDecodeFailed"),
    ],
)
async def test_parameter_codes(
    emulator_app: InProcessEmulator, payload: dict[str, Any], expected: str
) -> None:
    assert code(await emulator_app.call(payload)) == expected


async def test_body_that_is_not_a_json_object(emulator_app: InProcessEmulator) -> None:
    assert code(await emulator_app.call(b"not json")) == "InvalidParameter"
    assert code(await emulator_app.call(b"[1, 2]")) == "InvalidParameter"


async def test_gif_is_refused_with_a_message_saying_so(emulator_app: InProcessEmulator) -> None:
    resp = answer(await emulator_app.call({"ImageBase64": b64(plain_image("GIF"))}))
    assert resp["Error"]["Code"] == "FailedOperation.ImageDecodeFailed"
    assert "GIF" in resp["Error"]["Message"]


async def test_image_over_7_mb_after_base64(emulator_app: InProcessEmulator) -> None:
    limit = 7 * 1024 * 1024
    # Exactly at the limit passes the size rule (then fails as not-an-image)...
    at_limit = "A" * limit
    assert code(await emulator_app.call({"ImageBase64": at_limit})) != (
        "LimitExceeded.TooLargeFileError"
    )
    over = "A" * (limit + 4)
    assert code(await emulator_app.call({"ImageBase64": over})) == "LimitExceeded.TooLargeFileError"


async def test_png_specimen_and_empty_config_are_fine(emulator_app: InProcessEmulator) -> None:
    spec = make_specimen(23, fmt="PNG", no_expiry=True)
    resp = answer(await emulator_app.call({"ImageBase64": b64(spec.image), "Config": ""}))
    assert resp["ValidityPeriod"] == spec.truth["ValidityPeriod"]
    assert resp["ID"] == spec.truth["ID"]


async def test_non_specimen_is_counted_by_its_image_hash(emulator_app: InProcessEmulator) -> None:
    image = plain_image("PNG")
    assert code(await emulator_app.call({"ImageBase64": b64(image)})) == (
        "FailedOperation.ImageNoSpecifiedCard"
    )
    counters = await emulator_app.counters()
    assert counters["by_image_sha256"] == {hashlib.sha256(image).hexdigest(): 1}
    assert counters["ok_by_image_sha256"] == {}


# ---------------------------------------------------------------- downloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    """A local web server the emulator downloads ImageUrl from."""

    async def card_a(request: web.Request) -> web.Response:
        return web.Response(body=SPEC_A.image, content_type="image/jpeg")

    async def gif(request: web.Request) -> web.Response:
        return web.Response(body=plain_image("GIF"), content_type="image/gif")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.Response(body=SPEC_A.image, content_type="image/jpeg")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/a.jpg", card_a)
    app.router.add_get("/a.gif", gif)
    app.router.add_get("/slow.jpg", slow)
    app.router.add_get("/empty.jpg", empty)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_url_download_reads_the_card(
    emulator_app: InProcessEmulator, image_host: str
) -> None:
    resp = answer(await emulator_app.call({"ImageUrl": f"{image_host}/a.jpg"}))
    assert {k: v for k, v in resp.items() if k != "RequestId"} == SPEC_A.truth
    counters = await emulator_app.counters()
    assert counters["ok_by_image_sha256"] == {hashlib.sha256(SPEC_A.image).hexdigest(): 1}


async def test_url_wins_over_base64(emulator_app: InProcessEmulator, image_host: str) -> None:
    resp = answer(
        await emulator_app.call(
            {"ImageUrl": f"{image_host}/a.jpg", "ImageBase64": b64(SPEC_B.image)}
        )
    )
    assert resp["ID"] == SPEC_A.truth["ID"]
    # Even a broken base64 is ignored when a URL is given.
    resp = answer(
        await emulator_app.call({"ImageUrl": f"{image_host}/a.jpg", "ImageBase64": "%%%"})
    )
    assert resp["ID"] == SPEC_A.truth["ID"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/missing.jpg", "FailedOperation.DownLoadError"),
        ("/a.gif", "FailedOperation.ImageDecodeFailed"),
        ("/empty.jpg", "FailedOperation.EmptyImageError"),
    ],
)
async def test_url_failures(
    emulator_app: InProcessEmulator, image_host: str, path: str, expected: str
) -> None:
    assert code(await emulator_app.call({"ImageUrl": image_host + path})) == expected


async def test_url_refused_connection(emulator_app: InProcessEmulator) -> None:
    url = f"http://127.0.0.1:{free_port()}/a.jpg"
    assert code(await emulator_app.call({"ImageUrl": url})) == "FailedOperation.DownLoadError"


async def test_url_download_limit_is_three_seconds(
    emulator_app: InProcessEmulator, image_host: str
) -> None:
    knobs = await emulator_app.configure()
    assert knobs["download_timeout_s"] == 3.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await emulator_app.call({"ImageUrl": f"{image_host}/slow.jpg?s=6"})
    elapsed = loop.time() - started
    assert code(result) == "FailedOperation.DownLoadError"
    assert 2.9 <= elapsed < 5.0
    # A download well inside the limit is fine.
    result = await emulator_app.call({"ImageUrl": f"{image_host}/slow.jpg?s=0.5"})
    assert code(result) == "OK"


async def test_back_image_url_is_downloaded_and_checked(
    emulator_app: InProcessEmulator, image_host: str
) -> None:
    payload = {"ImageBase64": b64(SPEC_A.image), "BackImageUrl": f"{image_host}/missing.jpg"}
    assert code(await emulator_app.call(payload)) == "FailedOperation.DownLoadError"
    payload["BackImageUrl"] = f"{image_host}/a.jpg"
    assert code(await emulator_app.call(payload)) == "OK"
