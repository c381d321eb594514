"""Pre-flight checks: reject what Tencent would reject before spending quota on it.

Every rejection is an `InputError(rule, message)` with a stable rule name. Messages name the
rule and the side (front/back) and never carry image content or a URL (its query string may
hold a signed token).
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Final

import yarl

from worker.errors import InputError
from worker.netpolicy import PUBLIC_ONLY, UrlPolicy
from worker.tencent.types import PORTRAIT_CONFIG, ImageInput, OcrRequest
from worker.tencent.urls import check_url

# Tencent's limits are stated in MB; we read them as MiB, the SDK's and console's unit.
MAX_IMAGE_BASE64_BYTES: Final = 7 * 1024 * 1024
MAX_BODY_BYTES: Final = 10 * 1024 * 1024

PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC: Final = b"\xff\xd8\xff"
GIF_MAGICS: Final = (b"GIF87a", b"GIF89a")

# Config keys and the values the API documents for this action.
KNOWN_CONFIG: Final = {key: frozenset({value}) for key, value in PORTRAIT_CONFIG.items()}

_URL_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f]")

# (payload field for a URL, payload field for base64) per side.
_FIELDS: Final = {"front": ("ImageUrl", "ImageBase64"), "back": ("BackImageUrl", "BackImageBase64")}


def sniff_image_type(data: bytes) -> str | None:
    """`"png"` or `"jpeg"` by magic number, else None (GIF included: the API refuses it)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def base64_size(n_bytes: int) -> int:
    """Length of the padded base64 text of `n_bytes` bytes."""
    return 4 * math.ceil(n_bytes / 3)


def validate_image_bytes(data: bytes, side: str) -> None:
    """An inline image must be a non-empty PNG/JPEG of at most 7 MB once base64-encoded."""
    if not data:
        raise InputError("empty_image", f"{side} image is empty (rule empty_image)")
    if data.startswith(GIF_MAGICS):
        raise InputError(
            "gif_not_supported",
            f"{side} image is a GIF; the API takes PNG or JPEG only (rule gif_not_supported)",
        )
    if sniff_image_type(data) is None:
        raise InputError(
            "not_png_or_jpeg", f"{side} image is neither PNG nor JPEG (rule not_png_or_jpeg)"
        )
    encoded = base64_size(len(data))
    if encoded > MAX_IMAGE_BASE64_BYTES:
        raise InputError(
            "image_too_large",
            f"{side} image is {encoded} bytes as base64, over the "
            f"{MAX_IMAGE_BASE64_BYTES}-byte limit (rule image_too_large)",
        )


def validate_url(url: str, side: str, policy: UrlPolicy = PUBLIC_ONLY) -> None:
    """An image URL must be absolute http(s) with a host and no whitespace or control chars,
    and pass the URL policy that needs no network (`worker.tencent.urls.check_url`)."""
    problem = _url_problem(url)
    if problem is not None:
        raise InputError("bad_url", f"{side} image URL {problem} (rule bad_url)")
    check_url(url, side, policy)


def _url_problem(url: str) -> str | None:
    if not url:
        return "is empty"
    if _URL_FORBIDDEN.search(url):
        return "contains whitespace or control characters"
    try:
        parsed = yarl.URL(url)
        host = parsed.host
        parsed.port  # noqa: B018 -- raises on a non-numeric port
    except ValueError:
        return "is malformed"
    if parsed.scheme not in ("http", "https"):
        return "must use http or https"
    if not host:
        return "has no host"
    return None


def validate_config(config: dict[str, str] | None) -> None:
    """Only documented Config keys and values (RetImage: portrait) are sent."""
    for key, value in (config or {}).items():
        allowed = KNOWN_CONFIG.get(key)
        if allowed is None:
            raise InputError("bad_config", f"Config key {key!r} is not known (rule bad_config)")
        if value not in allowed:
            raise InputError(
                "bad_config",
                f"Config {key} must be one of {sorted(allowed)} (rule bad_config)",
            )


def validate_request(request: OcrRequest, policy: UrlPolicy = PUBLIC_ONLY) -> None:
    """Every pre-flight rule that reads no pixels and asks no network, in order; raises the
    first `InputError` found. The producer adds `worker.tencent.preflight`'s on top."""
    if request.front is None and request.back is None:
        raise InputError("no_image", "neither a front nor a back image was given (rule no_image)")
    if request.front is None:
        # The API's ImageUrl/ImageBase64 are the front; a back alone is MissingParameter,
        # a call bought to be told so.
        raise InputError("no_front", "a back image was given without a front image (rule no_front)")
    for side, image in (("front", request.front), ("back", request.back)):
        if image is None:
            continue
        if image.url is not None:
            validate_url(image.url, side, policy)
        else:
            validate_image_bytes(image.data or b"", side)
    validate_config(request.config())
    size = body_size(request)
    if size > MAX_BODY_BYTES:
        raise InputError(
            "request_too_large",
            f"request body would be {size} bytes, over the {MAX_BODY_BYTES}-byte limit "
            "(rule request_too_large)",
        )


class Base64Text(str):
    """Text from base64.b64encode: its alphabet needs no JSON escaping (see encode_body)."""

    __slots__ = ()


def build_payload(request: OcrRequest, *, inline: bool = True) -> dict[str, str]:
    """The JSON object sent to the API. With `inline=False` base64 fields are left empty,
    which `body_size` uses to measure the body without encoding the images."""
    payload: dict[str, str] = {}
    for side, image in (("front", request.front), ("back", request.back)):
        if image is None:
            continue
        url_field, b64_field = _FIELDS[side]
        if image.url is not None:
            payload[url_field] = image.url
        else:
            data = image.data or b""
            payload[b64_field] = Base64Text(
                base64.b64encode(data).decode("ascii") if inline else ""
            )
    config = request.config()
    if config:
        # The API wants Config as a JSON *string* inside the JSON body.
        payload["Config"] = json.dumps(config, separators=(",", ":"))
    return payload


def encode_body(payload: dict[str, str]) -> bytes:
    """The exact bytes that are signed and sent: `json.dumps(payload, separators=(",", ":"),
    ensure_ascii=False)` in UTF-8, with Base64Text values spliced in as they are (the JSON
    encoder would scan 80 KB of an image to find nothing to escape, twice the cost of the
    base64 encoding itself)."""
    parts = []
    for key, value in payload.items():
        text = f'"{value}"' if type(value) is Base64Text else _json_text(value)
        parts.append(f"{_json_text(key)}:{text}")
    return ("{" + ",".join(parts) + "}").encode("utf-8")


def _json_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def body_size(request: OcrRequest) -> int:
    """Exact size of `encode_body(build_payload(request))`: base64 text needs no JSON escaping,
    so it adds its own length to the skeleton's."""
    skeleton = len(encode_body(build_payload(request, inline=False)))
    inline = sum(
        base64_size(len(image.data))
        for image in (request.front, request.back)
        if isinstance(image, ImageInput) and image.data is not None
    )
    return skeleton + inline
