"""The URL fallback: after Tencent's download budget is spent, fetch the image ourselves.

Plain code the pipeline calls in its task thread: the fetch runs on the process's event
loop (`run`), the content checks (the same pre-flight rules as a file: PNG/JPEG, size,
whole decode, minimum side) here, off the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from worker.errors import InputError
from worker.netpolicy import UrlPolicy
from worker.settings import Settings
from worker.tencent.fetch import FetchRefused, fetch_image
from worker.tencent.preflight import check_image_decodes
from worker.tencent.types import ImageInput, OcrRequest
from worker.tencent.validation import validate_image_bytes, validate_request


def has_url(request: OcrRequest) -> bool:
    """Whether any side is a URL Tencent downloads."""
    return any(
        image is not None and image.url is not None for image in (request.front, request.back)
    )


def fetch_inline(
    run: Callable[[Coroutine[Any, Any, bytes]], bytes], request: OcrRequest, settings: Settings
) -> OcrRequest:
    """`request` with every URL side replaced by the bytes we fetched (DownLoadError does not
    say which side failed). Raises FetchRefused naming the rule; nothing is sent then."""
    policy = UrlPolicy(allow_loopback=settings.url_allow_loopback)
    sides: dict[str, ImageInput | None] = {}
    for side, image in (("front", request.front), ("back", request.back)):
        if image is None or image.url is None:
            sides[side] = image
            continue
        coro = fetch_image(
            image.url, side, policy=policy, timeout_s=settings.url_fallback_timeout_s
        )
        data = run(coro)
        try:
            validate_image_bytes(data, side)
            check_image_decodes(data, side, min_side_px=settings.min_image_side_px)
        except InputError as err:
            raise FetchRefused(err.rule, f"URL fallback: {err.message}") from None
        sides[side] = ImageInput(data=data)
    inline = replace(request, front=sides["front"], back=sides["back"])
    try:
        validate_request(inline)
    except InputError as err:
        raise FetchRefused(err.rule, f"URL fallback: {err.message}") from None
    return inline
