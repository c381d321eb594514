"""worker.tencent.signing agrees with the official SDK's own TC3 construction on any input.

The SDK side is its real code path (`_build_req_with_tc3_signature` and `_get_tc3_signature`
with `Sign.sign_tc3`), not a re-implementation, so a divergence in either direction shows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tencentcloud.common import abstract_client, credential
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.common.sign import Sign
from tencentcloud.ocr.v20181119 import ocr_client

from worker.tencent.signing import sign

ACTION = "RecognizeMacaoIDCardOCR"

secret_ids = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd")), min_size=1, max_size=40
)
# Any unicode (both sides encode as UTF-8); the SDK refuses keys with surrounding spaces.
secret_keys = st.text(min_size=1, max_size=64).filter(lambda k: k.strip() == k and k.strip())
timestamps = st.integers(min_value=0, max_value=4_102_444_800)  # 1970 .. 2100
hosts = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?(:[0-9]{1,5})?\Z")
param_values = st.one_of(
    st.text(max_size=200),
    st.integers(),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=20), max_size=4),
)
params = st.dictionaries(
    st.sampled_from(["ImageBase64", "ImageUrl", "BackImageBase64", "BackImageUrl", "Config"])
    | st.text(min_size=1, max_size=12),
    param_values,
    max_size=5,
)


def sdk_signed(
    secret_id: str, secret_key: str, host: str, body_params: dict[str, Any], timestamp: int
) -> RequestInternal:
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=host))
    client = ocr_client.OcrClient(credential.Credential(secret_id, secret_key), "", profile)
    req = RequestInternal(host, "POST", "/")
    with mock.patch.object(abstract_client, "time", SimpleNamespace(time=lambda: timestamp)):
        client._build_req_with_tc3_signature(ACTION, body_params, req)
    return req


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret_ids, secret_keys, hosts, params, timestamps)
def test_full_request_signature_matches_the_sdk(
    secret_id: str, secret_key: str, host: str, body_params: dict[str, Any], timestamp: int
) -> None:
    req = sdk_signed(secret_id, secret_key, host, body_params, timestamp)
    assert req.data == json.dumps(body_params)
    ours = sign(
        secret_id=secret_id,
        secret_key=secret_key,
        service="ocr",
        host=req.header["Host"],
        content_type=req.header["Content-Type"],
        body=req.data.encode("utf-8"),
        timestamp=int(req.header["X-TC-Timestamp"]),
    )
    assert ours.authorization == req.header["Authorization"]


@settings(max_examples=300, deadline=None)
@given(
    secret_keys,
    hosts,
    st.text(max_size=300),  # raw bodies, unicode included
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "application/octet-stream"]
    ),
    timestamps,
)
def test_canonical_pieces_match_the_sdk(
    secret_key: str, host: str, body: str, content_type: str, timestamp: int
) -> None:
    client = ocr_client.OcrClient(credential.Credential("AKIDx", secret_key), "")
    req = RequestInternal(
        host,
        "POST",
        "/",
        header={"Content-Type": content_type, "Host": host, "X-TC-Timestamp": str(timestamp)},
        data=body,
    )
    date = datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d")
    theirs = client._get_tc3_signature({}, req, date, "ocr", secret_key)
    ours = sign(
        secret_id="AKIDx",
        secret_key=secret_key,
        service="ocr",
        host=host,
        content_type=content_type,
        body=body.encode("utf-8"),
        timestamp=timestamp,
    )
    assert ours.signature == theirs


@given(secret_keys, st.text(max_size=200), timestamps, st.sampled_from(["ocr", "cvm"]))
def test_key_chain_matches_sign_tc3(
    secret_key: str, string_to_sign_tail: str, timestamp: int, service: str
) -> None:
    """The derivation alone: our sign() over a body vs Sign.sign_tc3 over the same string."""
    from worker.tencent.signing import ALGORITHM, canonical_request, sha256_hex, utc_date

    date = utc_date(timestamp)
    body = string_to_sign_tail.encode("utf-8")
    creq_hash = sha256_hex(canonical_request("application/json", "h", sha256_hex(body)).encode())
    string_to_sign = f"{ALGORITHM}\n{timestamp}\n{date}/{service}/tc3_request\n{creq_hash}"
    ours = sign(
        secret_id="AKIDx",
        secret_key=secret_key,
        service=service,
        host="h",
        content_type="application/json",
        body=body,
        timestamp=timestamp,
    )
    assert ours.signature == Sign.sign_tc3(secret_key, date, service, string_to_sign)
