"""TC3-HMAC-SHA256 against the reference's two vectors, intermediate hashes included."""

from __future__ import annotations

import pytest

from worker.tencent import signing

# Vector A: Tencent's documented CVM example (backslash escapes are literal bytes).
A_BODY = rb'{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}'
A = {
    "secret_id": "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE",
    "secret_key": "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
    "service": "cvm",
    "host": "cvm.tencentcloudapi.com",
    "content_type": "application/json; charset=utf-8",
    "body": A_BODY,
    "timestamp": 1551113065,
}
# Vector B: this action, as the official SDK builds it.
B_BODY = b'{"ImageBase64": "aGVsbG8=", "Config": "{\\"RetImage\\":\\"portrait\\"}"}'
B = {
    "secret_id": "AKIDEXAMPLE",
    "secret_key": "SECRETKEYEXAMPLE",
    "service": "ocr",
    "host": "ocr.intl.tencentcloudapi.com",
    "content_type": "application/json",
    "body": B_BODY,
    "timestamp": 1700000000,
}


def test_vector_a() -> None:
    assert signing.utc_date(1551113065) == "2019-02-25"
    sig = signing.sign(**A)  # type: ignore[arg-type]
    assert sig.payload_hash == "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    assert (
        sig.canonical_request_hash
        == "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    )
    assert sig.signature == "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"


def test_vector_b() -> None:
    assert (
        B_BODY.decode()
        == '{"ImageBase64": "aGVsbG8=", "Config": "{\\"RetImage\\":\\"portrait\\"}"}'
    )
    assert signing.utc_date(1700000000) == "2023-11-14"
    sig = signing.sign(**B)  # type: ignore[arg-type]
    assert sig.payload_hash == "20ee47329e5d1ead5a64f9277bd9432acd8d175a369b8d566edc23cdddc07936"
    assert (
        sig.canonical_request_hash
        == "fa38d1b10958257b0f0e3c2d3054fb8e6c1a4f04e0482aca396efc8bddcf56e4"
    )
    assert sig.signature == "cbf744271bccd7a7fd9c20d78a9c60250aa5e677cb7a0a527cd79a6769ee7399"
    assert sig.authorization == (
        "TC3-HMAC-SHA256 Credential=AKIDEXAMPLE/2023-11-14/ocr/tc3_request, "
        "SignedHeaders=content-type;host, "
        "Signature=cbf744271bccd7a7fd9c20d78a9c60250aa5e677cb7a0a527cd79a6769ee7399"
    )


def test_canonical_request_layout() -> None:
    text = signing.canonical_request("application/json", "h:1", "abc")
    assert text == "POST\n/\n\ncontent-type:application/json\nhost:h:1\n\ncontent-type;host\nabc"


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("content_type", "application/octet-stream"),
        ("host", "ocr.intl.tencentcloudapi.com:443"),
        ("body", B_BODY + b" "),
        ("timestamp", 1700000001),
        ("secret_key", "SECRETKEYEXAMPLF"),
    ],
)
def test_every_input_changes_the_signature(change: str, value: object) -> None:
    base = signing.sign(**B)  # type: ignore[arg-type]
    other = signing.sign(**{**B, change: value})  # type: ignore[arg-type]
    assert other.signature != base.signature


def test_date_is_utc() -> None:
    # 2023-11-14 23:30 UTC is already the 15th in Macao (UTC+8): the scope must say the 14th.
    assert signing.utc_date(1700004600) == "2023-11-14"
    assert signing.utc_date(1700006400) == "2023-11-15"
