"""The action's parameters: body shape, Config, and each image (base64 or downloaded)."""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Final

import aiohttp
from PIL import Image

from emulator.envelope import CallError

FIELDS: Final = ("ImageUrl", "ImageBase64", "BackImageUrl", "BackImageBase64", "Config")
MAX_IMAGE_BASE64_BYTES: Final = 7 * 1024 * 1024
SUPPORTED_FORMATS: Final = ("JPEG", "PNG")


@dataclass(frozen=True)
class Params:
    """A parsed request; image fields are raw strings (None when absent)."""

    image_url: str | None
    image_base64: str | None
    back_image_url: str | None
    back_image_base64: str | None
    want_portrait: bool


@dataclass(frozen=True)
class DecodedImage:
    data: bytes
    image: Image.Image  # opened lazily: header read only
    sha256: str


def parse_params(body: bytes) -> Params:
    """Body JSON → Params, raising the documented code for each defect."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise CallError("InvalidParameter", "The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise CallError("InvalidParameter", "The request body must be a JSON object.")
    for name in payload:
        if name not in FIELDS:
            raise CallError("UnknownParameter", f"The parameter `{name}` is not recognized.")
    for name, value in payload.items():
        if value is not None and not isinstance(value, str):
            raise CallError("InvalidParameter", f"The parameter `{name}` must be a String.")
    return Params(
        image_url=payload.get("ImageUrl"),
        image_base64=payload.get("ImageBase64"),
        back_image_url=payload.get("BackImageUrl"),
        back_image_base64=payload.get("BackImageBase64"),
        want_portrait=_parse_config(payload.get("Config")),
    )


def _parse_config(raw: str | None) -> bool:
    """True when Config asks for the portrait. Unknown keys are ignored, as Tencent does."""
    if raw is None or raw == "":
        return False
    bad = CallError(
        "InvalidParameter.ConfigFormatError",
        'Config must be a JSON object string such as {"RetImage":"portrait"}.',
    )
    try:
        cfg = json.loads(raw)
    except ValueError:
        raise bad from None
    if not isinstance(cfg, dict) or not all(isinstance(v, str | bool) for v in cfg.values()):
        raise bad
    ret = cfg.get("RetImage", "")
    if ret not in ("", "portrait"):
        raise CallError(
            "InvalidParameter.ConfigFormatError",
            'Config RetImage must be "portrait" or "".',
        )
    return bool(ret == "portrait")


def _check_size_b64(length: int, side: str) -> None:
    if length > MAX_IMAGE_BASE64_BYTES:
        raise CallError(
            "LimitExceeded.TooLargeFileError",
            f"The {side} image is {length} bytes after base64; the limit is "
            f"{MAX_IMAGE_BASE64_BYTES}.",
        )


def decode_base64(text: str, side: str) -> bytes:
    """Base64 text → bytes, checking the 7 MB limit on the encoded size first."""
    _check_size_b64(len(text), side)
    try:
        # strict_mode: C-speed validation (b64decode(validate=True) runs a slow regex).
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        raise CallError(
            "FailedOperation.ImageDecodeFailed", f"The {side} image's base64 cannot be decoded."
        ) from None


def open_image(data: bytes, side: str) -> DecodedImage:
    """Identify the image from its header (no pixel decode): PNG or JPEG only."""
    if not data:
        raise CallError("FailedOperation.EmptyImageError", f"The {side} image is empty.")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # Pillow raises several types for junk; all mean "not an image"
        raise CallError(
            "FailedOperation.ImageDecodeFailed", f"The {side} image cannot be decoded."
        ) from None
    if img.format == "GIF":
        raise CallError(
            "FailedOperation.ImageDecodeFailed",
            f"The {side} image is a GIF; only PNG, JPG and JPEG are supported.",
        )
    if img.format not in SUPPORTED_FORMATS:
        raise CallError(
            "FailedOperation.ImageDecodeFailed",
            f"The {side} image format {img.format} is not supported; use PNG, JPG or JPEG.",
        )
    return DecodedImage(data=data, image=img, sha256=hashlib.sha256(data).hexdigest())


async def download(session: aiohttp.ClientSession, url: str, side: str, timeout_s: float) -> bytes:
    """Fetch an image URL as Tencent does: 3 s at most, 200 only, 7 MB (as base64) cap."""
    cap = MAX_IMAGE_BASE64_BYTES // 4 * 3  # the largest raw size whose base64 fits
    failed = CallError(
        "FailedOperation.DownLoadError", f"The {side} image could not be downloaded."
    )
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, allow_redirects=True) as resp:
                if resp.status != 200:
                    raise failed
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > cap:
                        _check_size_b64((size + 2) // 3 * 4, side)
                    chunks.append(chunk)
                return b"".join(chunks)
    except (TimeoutError, aiohttp.ClientError, ValueError, OSError):
        raise failed from None


async def obtain(
    session: aiohttp.ClientSession,
    url: str | None,
    b64: str | None,
    *,
    side: str,
    required: bool,
    timeout_s: float,
) -> DecodedImage | None:
    """One side's image: the URL wins over base64 when both are given."""
    if url:
        data = await download(session, url, side, timeout_s)
        _check_size_b64((len(data) + 2) // 3 * 4, side)
        return open_image(data, side)
    if b64 is not None or url is not None:
        if not b64:
            raise CallError("FailedOperation.EmptyImageError", f"The {side} image is empty.")
        return open_image(decode_base64(b64, side), side)
    if required:
        raise CallError(
            "MissingParameter",
            "The request is missing a required parameter: one of `ImageUrl` or `ImageBase64`.",
        )
    return None
