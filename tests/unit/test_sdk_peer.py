"""Tencent's official SDK as a peer: it talks to the emulator subprocess over real HTTP.

If the emulator (or worker.tencent.signing, which it verifies with) spoke a different protocol from
Tencent's, these calls would fail.
"""

from __future__ import annotations

import base64
import json
import math
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr
from tencentcloud.common import abstract_client, credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.ocr.v20181119 import models, ocr_client

from emulator.specimen import Specimen, make_specimen
from tests.fixtures.emulator import EmulatorProcess


def sdk_client(emu: EmulatorProcess, secret_key: str | None = None) -> Any:
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=emu.host))
    cred = credential.Credential(emu.secret_id, secret_key or emu.secret_key)
    return ocr_client.OcrClient(cred, "", profile)


def sdk_request(spec: Specimen, *, portrait: bool = False) -> Any:
    req = models.RecognizeMacaoIDCardOCRRequest()
    req.ImageBase64 = base64.b64encode(spec.image).decode()
    if portrait:
        req.Config = json.dumps({"RetImage": "portrait"})
    return req


def sdk_fields(resp: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(resp.to_json_string())
    doc.pop("RequestId")
    return doc


@pytest.mark.parametrize(
    "spec",
    [
        make_specimen(41),
        make_specimen(42, warnings=["screen_recapture", "tampered"]),
        make_specimen(43, fmt="PNG", no_expiry=True, permanent=False),
    ],
    ids=["plain", "warnings", "png-no-expiry"],
)
def test_sdk_reads_the_specimen_truth(emulator: EmulatorProcess, spec: Specimen) -> None:
    resp = sdk_client(emulator).RecognizeMacaoIDCardOCR(sdk_request(spec))
    assert resp.RequestId
    fields = sdk_fields(resp)
    assert fields == spec.truth
    assert emulator.counters()["by_code"] == {"OK": 1}


def test_sdk_gets_the_portrait(emulator: EmulatorProcess) -> None:
    spec = make_specimen(44)
    resp = sdk_client(emulator).RecognizeMacaoIDCardOCR(sdk_request(spec, portrait=True))
    assert base64.b64decode(resp.RetImage) == spec.portrait


def test_sdk_wrong_secret_key_is_signature_failure(emulator: EmulatorProcess) -> None:
    client = sdk_client(emulator, secret_key="not-the-right-key")
    with pytest.raises(TencentCloudSDKException) as info:
        client.RecognizeMacaoIDCardOCR(sdk_request(make_specimen(45)))
    assert info.value.get_code() == "AuthFailure.SignatureFailure"
    assert info.value.get_request_id()


def test_sdk_stale_timestamp_is_signature_expire(
    emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_s = time.time() - 10 * 60
    # Only the SDK's clock is moved; the emulator process keeps the real one.
    monkeypatch.setattr(abstract_client, "time", SimpleNamespace(time=lambda: stale_s))
    with pytest.raises(TencentCloudSDKException) as info:
        sdk_client(emulator).RecognizeMacaoIDCardOCR(sdk_request(make_specimen(46)))
    assert info.value.get_code() == "AuthFailure.SignatureExpire"


def test_sdk_sees_throttling_and_input_errors(emulator: EmulatorProcess) -> None:
    client = sdk_client(emulator)
    bad = models.RecognizeMacaoIDCardOCRRequest()
    bad.ImageBase64 = base64.b64encode(b"GIF89a not really").decode()
    with pytest.raises(TencentCloudSDKException) as info:
        client.RecognizeMacaoIDCardOCR(bad)
    assert info.value.get_code() == "FailedOperation.ImageDecodeFailed"

    emulator.configure(quota_per_s=1)
    # Both calls in a fresh 1-second window: the refused call above counts in its own one.
    time.sleep(math.floor(time.time()) + 1 - time.time())
    client.RecognizeMacaoIDCardOCR(sdk_request(make_specimen(47)))
    with pytest.raises(TencentCloudSDKException) as info:
        client.RecognizeMacaoIDCardOCR(sdk_request(make_specimen(47)))
    assert info.value.get_code() == "RequestLimitExceeded"


def test_sdk_misses_errors_under_a_charset_content_type(emulator: EmulatorProcess) -> None:
    """The reference's warning, reproduced: why the worker looks for Response.Error itself."""
    emulator.configure(force_error_code="FailedOperation.OcrFailed", json_charset=True)
    resp = sdk_client(emulator).RecognizeMacaoIDCardOCR(sdk_request(make_specimen(48)))
    assert resp.ID is None  # no exception, an empty result: the error went unseen
    assert emulator.counters()["by_code"] == {"FailedOperation.OcrFailed": 1}


async def test_sdk_and_our_client_read_the_same_fields(emulator: EmulatorProcess) -> None:
    tencent_client = pytest.importorskip("worker.tencent.client")
    from worker.tencent.types import ImageInput, OcrRequest

    spec = make_specimen(49, warnings=["glare"], no_expiry=True)
    sdk = sdk_fields(sdk_client(emulator).RecognizeMacaoIDCardOCR(sdk_request(spec, portrait=True)))
    config = tencent_client.ClientConfig(
        endpoint=emulator.url,
        host=emulator.host,
        secret_id=emulator.secret_id,
        secret_key=SecretStr(emulator.secret_key),
    )
    async with aiohttp.ClientSession() as session:
        ours = await tencent_client.OcrClient(session, config).recognize(
            OcrRequest(front=ImageInput(data=spec.image), portrait=True)
        )

    def dmy(value: Any) -> str:
        return str(value.strftime("%d-%m-%Y"))

    assert {
        "CnLastName": ours.cn_last_name,
        "EnLastName": ours.en_last_name,
        "LastNameCode": ours.last_name_code,
        "CnFirstName": ours.cn_first_name,
        "EnFirstName": ours.en_first_name,
        "FirstNameCode": ours.first_name_code,
        "ID": ours.id_number,
        "Birthday": dmy(ours.birthday),
        "Sex": ours.sex,
        "FirstIssueDate": dmy(ours.first_issue_date),
        "CurrentIssueDate": dmy(ours.current_issue_date),
        "ValidityPeriod": ours.validity_period_text,
        "Symbol": ours.symbol,
        "Height": str(ours.height_m),
        "ResidentType": ours.resident_type,
        "WarnCardInfos": [w.code for w in ours.warnings],
        "RetImage": base64.b64encode(ours.portrait or b"").decode(),
        "Angle": ours.angle,
    } == sdk
    assert ours.validity_not_a_date
    assert emulator.counters()["by_code"] == {"OK": 2}
