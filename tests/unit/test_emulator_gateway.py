"""The emulator's gateway checks, one at a time and in Tencent's order."""

from __future__ import annotations

import base64
import re
import time
import uuid
from typing import Any

import pytest

from emulator.specimen import make_specimen
from tests.fixtures.emulator import InProcessEmulator

SPEC = make_specimen(11)
GOOD = {"ImageBase64": base64.b64encode(SPEC.image).decode()}


def error_code(result: tuple[int, Any]) -> str:
    status, doc = result
    assert status == 200, doc
    resp = doc["Response"]
    uuid.UUID(resp["RequestId"])  # every answer carries a RequestId
    return str(resp["Error"]["Code"]) if "Error" in resp else "OK"


async def test_a_correct_call_succeeds(emulator_app: InProcessEmulator) -> None:
    assert error_code(await emulator_app.call(GOOD)) == "OK"


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("PUT", "/"), ("POST", "/other")])
async def test_only_post_root_is_the_api(
    emulator_app: InProcessEmulator, method: str, path: str
) -> None:
    result = await emulator_app.call(GOOD, method=method, path=path)
    assert error_code(result) == "UnsupportedProtocol"


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
async def test_content_type_must_be_json_even_when_signed(
    emulator_app: InProcessEmulator, content_type: str
) -> None:
    result = await emulator_app.call(GOOD, content_type=content_type)
    code = error_code(result)
    assert code == "InvalidParameter"
    assert "Content-Type" in result[1]["Response"]["Error"]["Message"]


async def test_json_with_charset_is_accepted_when_signed_as_sent(
    emulator_app: InProcessEmulator,
) -> None:
    ct = "application/json; charset=utf-8"
    assert error_code(await emulator_app.call(GOOD, content_type=ct)) == "OK"


async def test_missing_content_type_is_refused(emulator_app: InProcessEmulator) -> None:
    result = await emulator_app.call(GOOD, drop=("Content-Type",))
    assert error_code(result) == "InvalidParameter"


@pytest.mark.parametrize(
    ("headers", "drop", "code"),
    [
        ({}, ("X-TC-Action",), "MissingParameter"),
        ({"X-TC-Action": "RecognizeHKIDCardOCR"}, (), "InvalidAction"),
        ({}, ("X-TC-Version",), "MissingParameter"),
        ({"X-TC-Version": "2020-01-01"}, (), "NoSuchVersion"),
    ],
)
async def test_action_and_version(
    emulator_app: InProcessEmulator, headers: dict[str, str], drop: tuple[str, ...], code: str
) -> None:
    assert error_code(await emulator_app.call(GOOD, headers=headers, drop=drop)) == code


@pytest.mark.parametrize(
    ("offset_s", "code"),
    [
        (-301, "AuthFailure.SignatureExpire"),
        (+301, "AuthFailure.SignatureExpire"),
        (-290, "OK"),
        (+290, "OK"),
    ],
)
async def test_timestamp_window_is_five_minutes(
    emulator_app: InProcessEmulator, offset_s: int, code: str
) -> None:
    ts = int(time.time()) + offset_s
    assert error_code(await emulator_app.call(GOOD, timestamp=ts)) == code


async def test_missing_timestamp(emulator_app: InProcessEmulator) -> None:
    result = await emulator_app.call(GOOD, drop=("X-TC-Timestamp",))
    assert error_code(result) == "MissingParameter"


async def test_unknown_secret_id(emulator_app: InProcessEmulator) -> None:
    result = await emulator_app.call(GOOD, secret_id="AKIDnobody")
    assert error_code(result) == "AuthFailure.SecretIdNotFound"


async def test_wrong_secret_key(emulator_app: InProcessEmulator) -> None:
    result = await emulator_app.call(GOOD, secret_key="not-the-key")
    assert error_code(result) == "AuthFailure.SignatureFailure"


async def test_signature_covers_the_body(emulator_app: InProcessEmulator) -> None:
    body = b'{"ImageBase64": "' + GOOD["ImageBase64"].encode() + b'"}'
    _, doc = await emulator_app.call(body)
    assert "Error" not in doc["Response"]
    # Same headers, one byte of body changed (extra space): the hash no longer matches.
    from tests.fixtures.emulator import tc3_headers

    hdrs = tc3_headers(
        secret_id=emulator_app.secret_id,
        secret_key=emulator_app.secret_key,
        host=emulator_app.host,
        body=body,
    )
    resp = await emulator_app.client.post("/", data=body.replace(b": ", b":  "), headers=hdrs)
    doc = await resp.json(content_type=None)
    assert doc["Response"]["Error"]["Code"] == "AuthFailure.SignatureFailure"


async def test_signature_uses_the_host_header_as_received(
    emulator_app: InProcessEmulator,
) -> None:
    # Signed for one host, sent with another: refused.
    result = await emulator_app.call(GOOD, sign_host="ocr.ap-hongkong.tencentcloudapi.com")
    assert error_code(result) == "AuthFailure.SignatureFailure"
    # Signed and sent with a host:port: accepted (what a client of the emulator does).
    emulator_app.host = "127.0.0.1:8089"
    assert error_code(await emulator_app.call(GOOD)) == "OK"


async def test_scope_date_must_match_the_timestamp(emulator_app: InProcessEmulator) -> None:
    from tests.fixtures.emulator import tc3_headers

    body = b'{"ImageBase64": "' + GOOD["ImageBase64"].encode() + b'"}'
    hdrs = tc3_headers(
        secret_id=emulator_app.secret_id,
        secret_key=emulator_app.secret_key,
        host=emulator_app.host,
        body=body,
    )
    # Same signature, scope date shifted by a day.
    auth = re.sub(r"/(\d{4})-(\d{2})-(\d{2})/", "/1999-01-01/", hdrs["Authorization"])
    resp = await emulator_app.client.post("/", data=body, headers={**hdrs, "Authorization": auth})
    doc = await resp.json(content_type=None)
    assert doc["Response"]["Error"]["Code"] == "AuthFailure.SignatureFailure"


@pytest.mark.parametrize("auth", ["", "Basic dXNlcjpwYXNz", "TC3-HMAC-SHA256 Credential=x"])
async def test_malformed_authorization(emulator_app: InProcessEmulator, auth: str) -> None:
    result = await emulator_app.call(GOOD, headers={"Authorization": auth})
    assert error_code(result) == "AuthFailure.InvalidAuthorization"


async def test_body_over_10_mb_is_refused_before_the_signature(
    emulator_app: InProcessEmulator,
) -> None:
    big = b'{"ImageBase64": "' + b"A" * (10 * 1024 * 1024) + b'"}'
    result = await emulator_app.call(big, secret_key="wrong-key-too")
    assert error_code(result) == "RequestSizeLimitExceeded"


async def test_order_timestamp_before_signature(emulator_app: InProcessEmulator) -> None:
    stale = int(time.time()) - 3600
    result = await emulator_app.call(GOOD, timestamp=stale, secret_key="wrong")
    assert error_code(result) == "AuthFailure.SignatureExpire"


async def test_order_content_type_before_action(emulator_app: InProcessEmulator) -> None:
    result = await emulator_app.call(
        GOOD, content_type="text/plain", headers={"X-TC-Action": "Nope"}
    )
    assert error_code(result) == "InvalidParameter"


async def test_order_signature_before_quota_and_parameters(
    emulator_app: InProcessEmulator,
) -> None:
    await emulator_app.configure(quota_per_s=1)
    # Bad signatures never spend quota...
    for _ in range(3):
        result = await emulator_app.call({"Bogus": "1"}, secret_key="wrong")
        assert error_code(result) == "AuthFailure.SignatureFailure"
    # ...quota is checked before parameters (start early in a second so both land in it).
    while time.time() % 1 > 0.5:
        time.sleep(0.05)
    assert error_code(await emulator_app.call({"Bogus": "1"})) == "UnknownParameter"
    assert error_code(await emulator_app.call({"Bogus": "1"})) == "RequestLimitExceeded"


async def test_success_envelope_has_exactly_the_reference_fields(
    emulator_app: InProcessEmulator,
) -> None:
    status, doc = await emulator_app.call(GOOD)
    assert status == 200
    assert set(doc) == {"Response"}
    expected = {
        "CnLastName",
        "EnLastName",
        "LastNameCode",
        "CnFirstName",
        "EnFirstName",
        "FirstNameCode",
        "ID",
        "Birthday",
        "Sex",
        "FirstIssueDate",
        "CurrentIssueDate",
        "ValidityPeriod",
        "Symbol",
        "Height",
        "RetImage",
        "Angle",
        "ResidentType",
        "WarnCardInfos",
        "RequestId",
    }
    assert set(doc["Response"]) == expected
    fields = {k: v for k, v in doc["Response"].items() if k != "RequestId"}
    assert fields == SPEC.truth


async def test_answers_are_plain_application_json(emulator_app: InProcessEmulator) -> None:
    resp = await emulator_app.client.post("/", data=b"{}")
    assert resp.headers["Content-Type"] == "application/json"
    await emulator_app.configure(json_charset=True)
    resp = await emulator_app.client.post("/", data=b"{}")
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
