"""Quota, injected faults, latency, portrait, -9109 and the counters of the emulator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from emulator.app import create_app
from emulator.config import EmulatorConfig
from emulator.specimen import PORTRAIT_BOX, make_specimen
from tests.fixtures.emulator import InProcessEmulator

SPEC = make_specimen(31, warnings=["photocopy", "blurry"])
GOOD = {"ImageBase64": base64.b64encode(SPEC.image).decode()}


def code(result: tuple[int, Any]) -> str:
    status, doc = result
    assert status == 200, doc
    resp = doc["Response"]
    return str(resp["Error"]["Code"]) if "Error" in resp else "OK"


def wait_for_fresh_second() -> None:
    """Start a burst early in a 1-second window so it cannot straddle two."""
    while time.time() % 1 > 0.3:
        time.sleep(0.02)


async def test_quota_per_secret_id_per_second(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(quota_per_s=3)
    wait_for_fresh_second()
    second = int(time.time())
    codes = [code(await emulator_app.call(GOOD)) for _ in range(8)]
    assert codes == ["OK"] * 3 + ["RequestLimitExceeded"] * 5
    counters = await emulator_app.counters()
    assert counters["windows"][str(second)] == {"accepted": 3, "throttled": 5}
    assert counters["max_accepted_per_window"] == 3
    assert counters["throttled"] == 5
    assert counters["by_code"] == {"OK": 3, "RequestLimitExceeded": 5}
    # The next window starts afresh.
    await asyncio.sleep(1.0 - time.time() % 1 + 0.05)
    assert code(await emulator_app.call(GOOD)) == "OK"


async def test_quota_is_counted_per_secret_id() -> None:
    creds = {"AKIDone": "key-one", "AKIDtwo": "key-two"}
    app = create_app(EmulatorConfig(credentials=creds, control_token="tok"))
    async with TestClient(TestServer(app)) as client:
        one = InProcessEmulator(
            client=client, secret_id="AKIDone", secret_key="key-one", control_token="tok"
        )
        two = InProcessEmulator(
            client=client, secret_id="AKIDtwo", secret_key="key-two", control_token="tok"
        )
        await one.configure(quota_per_s=2)
        wait_for_fresh_second()
        got = [code(await emu.call(GOOD)) for emu in (one, one, one, two, two, two)]
        assert got == ["OK", "OK", "RequestLimitExceeded"] * 2
        counters = await one.counters()
        assert counters["by_secret_id"] == {"AKIDone": 3, "AKIDtwo": 3}
        per_sid = counters["windows_by_secret_id"]
        assert [sum(w["accepted"] for w in per_sid[s].values()) for s in creds] == [2, 2]


async def test_quota_zero_means_unlimited(emulator_app: InProcessEmulator) -> None:
    codes = [code(await emulator_app.call(GOOD)) for _ in range(12)]
    assert codes == ["OK"] * 12


@pytest.mark.parametrize(
    ("knob", "expected"),
    [
        ("ocr_failed", "FailedOperation.OcrFailed"),
        ("download_error", "FailedOperation.DownLoadError"),
        ("internal_error", "InternalError"),
    ],
)
async def test_engine_faults(emulator_app: InProcessEmulator, knob: str, expected: str) -> None:
    await emulator_app.configure(**{knob: 1.0})
    assert code(await emulator_app.call(GOOD)) == expected
    await emulator_app.configure(**{knob: 0.0})
    assert code(await emulator_app.call(GOOD)) == "OK"


async def test_engine_faults_come_after_parameter_checks(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(ocr_failed=1.0)
    assert code(await emulator_app.call({})) == "MissingParameter"


async def test_fault_probability_is_roughly_honoured(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(ocr_failed=0.3)
    codes = [code(await emulator_app.call(GOOD)) for _ in range(200)]
    share = codes.count("FailedOperation.OcrFailed") / len(codes)
    assert 0.18 < share < 0.42
    assert set(codes) == {"OK", "FailedOperation.OcrFailed"}


async def test_force_error_code_answers_every_valid_call(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(force_error_code="ResourceUnavailable.InArrears")
    assert code(await emulator_app.call(GOOD)) == "ResourceUnavailable.InArrears"
    assert code(await emulator_app.call(GOOD, secret_key="bad")) == "AuthFailure.SignatureFailure"
    await emulator_app.configure(force_error_code=None)
    assert code(await emulator_app.call(GOOD)) == "OK"


async def test_reset_closes_the_connection_without_an_answer(
    emulator_app: InProcessEmulator,
) -> None:
    await emulator_app.configure(reset=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await emulator_app.call(GOOD)
    await emulator_app.configure(reset=0.0)
    assert code(await emulator_app.call(GOOD)) == "OK"
    counters = await emulator_app.counters()
    assert counters["by_code"] == {"Transport.Reset": 1, "OK": 1}


async def test_http_502_has_no_tencent_body(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(http_502=1.0)
    status, body = await emulator_app.call(GOOD)
    assert status == 502
    assert isinstance(body, str) and "Response" not in body
    assert (await emulator_app.counters())["by_code"] == {"Transport.HTTP502": 1}


async def test_latency_median(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(latency_median_ms=300, latency_sigma=0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert code(await emulator_app.call(GOOD)) == "OK"
    assert loop.time() - started >= 0.3
    await emulator_app.configure(latency_median_ms=0)
    started = loop.time()
    await emulator_app.call(GOOD)
    assert loop.time() - started < 0.3


async def test_latency_tail(emulator_app: InProcessEmulator) -> None:
    await emulator_app.configure(
        latency_median_ms=10, latency_sigma=0.0, latency_tail_prob=1.0, latency_tail_mult=20
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await emulator_app.call(GOOD)
    assert loop.time() - started >= 0.2


async def test_portrait_only_when_config_asks(emulator_app: InProcessEmulator) -> None:
    _, doc = await emulator_app.call(GOOD)
    assert doc["Response"]["RetImage"] == ""
    _, doc = await emulator_app.call({**GOOD, "Config": '{"RetImage":"portrait"}'})
    portrait = base64.b64decode(doc["Response"]["RetImage"])
    assert portrait == SPEC.portrait
    img = Image.open(io.BytesIO(portrait))
    assert img.format == "JPEG"
    left, top, right, bottom = PORTRAIT_BOX
    assert img.size == (right - left, bottom - top)
    await emulator_app.configure(portrait_enabled=False)
    _, doc = await emulator_app.call({**GOOD, "Config": '{"RetImage":"portrait"}'})
    assert doc["Response"]["RetImage"] == ""


async def test_warning_service_disabled_knob(emulator_app: InProcessEmulator) -> None:
    _, doc = await emulator_app.call(GOOD)
    assert doc["Response"]["WarnCardInfos"] == [-9102, -9108]
    await emulator_app.configure(warning_service_disabled=True)
    _, doc = await emulator_app.call(GOOD)
    assert doc["Response"]["WarnCardInfos"] == [-9109]
    assert doc["Response"]["ID"] == SPEC.truth["ID"]


async def test_counters_and_reset(emulator_app: InProcessEmulator) -> None:
    other = make_specimen(32)
    await emulator_app.call(GOOD)
    await emulator_app.call(GOOD)
    await emulator_app.call({"ImageBase64": base64.b64encode(other.image).decode()})
    await emulator_app.call(GOOD, secret_key="wrong")
    counters = await emulator_app.counters()
    sha_a = hashlib.sha256(SPEC.image).hexdigest()
    sha_b = hashlib.sha256(other.image).hexdigest()
    assert counters["total"] == 4
    assert counters["ok"] == 3
    assert counters["by_code"] == {"OK": 3, "AuthFailure.SignatureFailure": 1}
    assert counters["by_secret_id"] == {emulator_app.secret_id: 3}  # authenticated calls only
    assert counters["by_image_sha256"] == {sha_a: 2, sha_b: 1}
    assert counters["ok_by_image_sha256"] == {sha_a: 2, sha_b: 1}
    assert sum(w["accepted"] for w in counters["windows"].values()) == 3

    await emulator_app.configure(quota_per_s=7)
    resp = await emulator_app.client.post(
        "/__emulator__/reset", headers=emulator_app.control_headers
    )
    assert resp.status == 200
    counters = await emulator_app.counters()
    assert counters["total"] == 0 and counters["windows"] == {} and counters["by_code"] == {}
    assert (await emulator_app.configure())["quota_per_s"] == 7  # knobs survive a plain reset
    await emulator_app.client.post(
        "/__emulator__/reset?knobs=1", headers=emulator_app.control_headers
    )
    assert (await emulator_app.configure())["quota_per_s"] == 0


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        ({"ocr_failed": 1.5}, "ocr_failed"),
        ({"quota_per_s": -1}, "quota_per_s"),
        ({"no_such_knob": 1}, "no_such_knob"),
        ({"warning_service_disabled": "maybe"}, "warning_service_disabled"),
    ],
)
async def test_bad_knobs_are_refused_by_name(
    emulator_app: InProcessEmulator, knobs: dict[str, Any], named: str
) -> None:
    before = await emulator_app.configure()
    resp = await emulator_app.client.post(
        "/__emulator__/config", json=knobs, headers=emulator_app.control_headers
    )
    assert resp.status == 400
    assert named in (await resp.json())["error"]
    assert await emulator_app.configure() == before  # nothing half-applied


async def test_specimen_endpoint_serves_cards(emulator_app: InProcessEmulator) -> None:
    resp = await emulator_app.client.get(
        "/__emulator__/specimen", params={"seed": "5", "warn": "glare"}
    )
    assert resp.status == 200
    assert await resp.read() == make_specimen(5, warnings=["glare"]).image
    resp = await emulator_app.client.get("/__emulator__/specimen", params={"warn": "sparkles"})
    assert resp.status == 400


def test_create_app_refuses_no_credentials() -> None:
    with pytest.raises(ValueError, match="credential"):
        create_app(EmulatorConfig(credentials={}))
