"""Pre-flight validation: every rule rejects what it should and passes what it should."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from worker.errors import InputError
from worker.tencent.types import ImageInput, OcrRequest
from worker.tencent.validation import (
    MAX_BODY_BYTES,
    MAX_IMAGE_BASE64_BYTES,
    base64_size,
    body_size,
    build_payload,
    encode_body,
    sniff_image_type,
    validate_config,
    validate_image_bytes,
    validate_request,
    validate_url,
)


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _image("PNG")
JPEG = _image("JPEG")
GIF = _image("GIF")
WEBP = _image("WEBP")


def _jpeg_of_size(n: int) -> bytes:
    # Magic numbers are all the validator reads; the padding stands in for pixel data.
    return JPEG[:3] + b"\0" * (n - 3)


def _rule(exc: pytest.ExceptionInfo[InputError]) -> str:
    return exc.value.rule


def test_sniff_png_and_jpeg() -> None:
    assert sniff_image_type(PNG) == "png"
    assert sniff_image_type(JPEG) == "jpeg"


@pytest.mark.parametrize("data", [GIF, WEBP, b"", b"\x89PN", b"hello world", b"%PDF-1.7"])
def test_sniff_rejects_others(data: bytes) -> None:
    assert sniff_image_type(data) is None


@pytest.mark.parametrize("data", [PNG, JPEG])
def test_valid_images_pass(data: bytes) -> None:
    validate_image_bytes(data, "front")
    validate_request(OcrRequest(front=ImageInput(data=data)))


def test_empty_image() -> None:
    with pytest.raises(InputError) as exc:
        validate_image_bytes(b"", "back")
    assert _rule(exc) == "empty_image"
    assert "back" in str(exc.value) and "empty_image" in str(exc.value)


def test_gif_is_named() -> None:
    with pytest.raises(InputError) as exc:
        validate_image_bytes(GIF, "front")
    assert _rule(exc) == "gif_not_supported"
    assert "GIF" in exc.value.message and "front" in exc.value.message


@pytest.mark.parametrize("data", [WEBP, b"not an image at all", b"%PDF-1.7 ..."])
def test_not_png_or_jpeg(data: bytes) -> None:
    with pytest.raises(InputError) as exc:
        validate_image_bytes(data, "front")
    assert _rule(exc) == "not_png_or_jpeg"
    assert "front" in exc.value.message


def test_base64_size_formula() -> None:
    import base64

    for n in (0, 1, 2, 3, 4, 5, 100, 1001):
        assert base64_size(n) == len(base64.b64encode(b"x" * n))


def test_image_at_limit_passes_and_one_byte_more_fails() -> None:
    # The largest raw size whose base64 fits in 7 MB, then the next size that does not.
    largest = MAX_IMAGE_BASE64_BYTES // 4 * 3
    assert base64_size(largest) <= MAX_IMAGE_BASE64_BYTES < base64_size(largest + 1)
    validate_image_bytes(_jpeg_of_size(largest), "front")
    with pytest.raises(InputError) as exc:
        validate_image_bytes(_jpeg_of_size(largest + 1), "back")
    assert _rule(exc) == "image_too_large"
    assert "back" in exc.value.message


def test_front_and_back_over_body_limit() -> None:
    # Each side alone is under 7 MB as base64, together well over 10 MB.
    side = _jpeg_of_size(6 * 1024 * 1024 * 3 // 4)
    validate_request(OcrRequest(front=ImageInput(data=side)))
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(front=ImageInput(data=side), back=ImageInput(data=side)))
    assert _rule(exc) == "request_too_large"


def test_body_limit_is_exact() -> None:
    front = _jpeg_of_size(5 * 1024 * 1024)
    overhead = body_size(OcrRequest(front=ImageInput(data=front), back=ImageInput(data=b"")))
    # Choose the back image so the body is exactly at the limit, then one base64 quantum more.
    back_b64 = MAX_BODY_BYTES - overhead
    fits = _jpeg_of_size(back_b64 // 4 * 3)
    request = OcrRequest(front=ImageInput(data=front), back=ImageInput(data=fits))
    exact = body_size(request)
    assert exact == len(encode_body(build_payload(request)))
    assert MAX_BODY_BYTES - 4 < exact <= MAX_BODY_BYTES
    validate_request(request)
    too_big = _jpeg_of_size(back_b64 // 4 * 3 + 1)
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(front=ImageInput(data=front), back=ImageInput(data=too_big)))
    assert _rule(exc) == "request_too_large"


@pytest.mark.parametrize(
    "request_",
    [
        OcrRequest(front=ImageInput(data=PNG)),
        OcrRequest(front=ImageInput(data=PNG), back=ImageInput(data=JPEG), portrait=True),
        OcrRequest(front=ImageInput(url="https://example.com/a.png?sig=x&y=\u00e9")),
        OcrRequest(back=ImageInput(url='http://h/"quoted"\\path')),
        OcrRequest(front=ImageInput(data=JPEG), back=ImageInput(url="https://e.com/b.jpg")),
    ],
)
def test_body_size_equals_encoded_body(request_: OcrRequest) -> None:
    assert body_size(request_) == len(encode_body(build_payload(request_)))


def test_payload_fields_and_config_string() -> None:
    payload = build_payload(
        OcrRequest(
            front=ImageInput(url="https://example.com/f.jpg"),
            back=ImageInput(data=PNG),
            portrait=True,
        )
    )
    assert set(payload) == {"ImageUrl", "BackImageBase64", "Config"}
    assert isinstance(payload["Config"], str)
    assert json.loads(payload["Config"]) == {"RetImage": "portrait"}
    payload = build_payload(
        OcrRequest(front=ImageInput(data=JPEG), back=ImageInput(url="http://x/b"))
    )
    assert set(payload) == {"ImageBase64", "BackImageUrl"}


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/card.jpg",
        "https://cdn.example.com:8443/a/b.png?X-Sig=abc&exp=1",
        "http://93.184.215.14:9000/x",
        "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:8443/x.jpg",
    ],
)
def test_good_urls(url: str) -> None:
    validate_url(url, "front")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.com/card.jpg",
        "file:///etc/passwd",
        "example.com/card.jpg",
        "http://",
        "http:///card.jpg",
        "http://exa mple.com/a.jpg",
        "http://example.com/a b.jpg",
        "http://example.com/a.jpg\n",
        "https://example.com:notaport/a.jpg",
        "javascript:alert(1)",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InputError) as exc:
        validate_url(url, "back")
    assert _rule(exc) == "bad_url"
    assert "back" in exc.value.message


def test_bad_url_message_hides_query() -> None:
    secret_query = "token=SUPERSECRET123"
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(front=ImageInput(url=f"ftp://host/a.jpg?{secret_query}")))
    assert _rule(exc) == "bad_url"
    assert "SUPERSECRET123" not in str(exc.value)
    assert "ftp://" not in str(exc.value) and "a.jpg" not in str(exc.value)


def test_config_portrait_passes() -> None:
    validate_config({"RetImage": "portrait"})
    validate_config(None)
    validate_request(OcrRequest(front=ImageInput(data=PNG), extra_config={"RetImage": "portrait"}))


@pytest.mark.parametrize(
    "config",
    [{"RetImage": "card"}, {"RetImage": ""}, {"Quality": "true"}, {"retimage": "portrait"}],
)
def test_bad_config(config: dict[str, str]) -> None:
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(front=ImageInput(data=PNG), extra_config=config))
    assert _rule(exc) == "bad_config"


def test_no_image() -> None:
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest())
    assert _rule(exc) == "no_image"


def test_front_alone_is_enough() -> None:
    validate_request(OcrRequest(front=ImageInput(data=PNG)))


@pytest.mark.parametrize("back", [ImageInput(data=JPEG), ImageInput(url="https://e.com/b.jpg")])
def test_back_without_front_is_refused(back: ImageInput) -> None:
    # The API reads ImageUrl/ImageBase64 as the front: a back alone is MissingParameter.
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(back=back))
    assert _rule(exc) == "no_front"
    assert "front" in exc.value.message


def test_back_side_is_named() -> None:
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(front=ImageInput(data=PNG), back=ImageInput(data=GIF)))
    assert _rule(exc) == "gif_not_supported"
    assert "back" in exc.value.message and "front" not in exc.value.message


def test_error_carries_no_image_bytes() -> None:
    data = b"\x00SENTINEL-PIXELS" * 10
    with pytest.raises(InputError) as exc:
        validate_request(OcrRequest(front=ImageInput(data=data)))
    assert "SENTINEL" not in str(exc.value) and "SENTINEL" not in repr(exc.value)
    assert exc.value.code == "Input.not_png_or_jpeg"


@settings(max_examples=60, deadline=None)
@given(
    front=st.binary(min_size=1, max_size=3000),
    back=st.one_of(st.none(), st.binary(min_size=1, max_size=300)),
    url=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    portrait=st.booleans(),
)
def test_encode_body_is_exactly_json_dumps(
    front: bytes, back: bytes | None, url: str | None, portrait: bool
) -> None:
    # The base64 values are spliced in without the JSON encoder: the bytes (which are what
    # is signed) must still be json.dumps's, whatever else the payload holds.
    request = OcrRequest(
        front=ImageInput(data=front),
        back=ImageInput(url=url) if url is not None else ImageInput(data=back) if back else None,
        portrait=portrait,
    )
    payload = build_payload(request)
    payload["Extra"] = 'quote " backslash \\ newline \n 陳'
    expected = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert encode_body(payload) == expected
    assert json.loads(encode_body(payload)) == payload
