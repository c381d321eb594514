"""Tencent's answer shapes: HTTP 200 with `{"Response": {...}}` for success and for errors."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class CallError(Exception):
    """A Tencent error answer: code + message, delivered inside an HTTP 200 envelope."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _json(payload: dict[str, Any], *, charset: bool) -> web.Response:
    # Built by hand: aiohttp's json_response always adds "; charset=utf-8", which Tencent
    # does not send (and which the SDK's error detection misses).
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    resp = web.Response(body=body, status=200)
    resp.headers["Content-Type"] = (
        "application/json; charset=utf-8" if charset else "application/json"
    )
    return resp


def error_response(
    code: str, message: str, request_id: str, *, charset: bool = False
) -> web.Response:
    """`{"Response": {"Error": {"Code", "Message"}, "RequestId"}}` with HTTP 200."""
    return _json(
        {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}},
        charset=charset,
    )


def success_response(
    fields: dict[str, Any], request_id: str, *, charset: bool = False
) -> web.Response:
    """`{"Response": {<fields>, "RequestId"}}` with HTTP 200."""
    return _json({"Response": {**fields, "RequestId": request_id}}, charset=charset)


def bad_gateway() -> web.Response:
    """What a failing load balancer in front of the API sends: no Tencent envelope."""
    return web.Response(
        status=502,
        text="<html><head><title>502 Bad Gateway</title></head><body>"
        "<center><h1>502 Bad Gateway</h1></center></body></html>",
        content_type="text/html",
    )
