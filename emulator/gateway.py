"""The API gateway's checks, in Tencent's order, up to and including the signature.

Each failed check raises CallError with the code Tencent documents for it.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from emulator.envelope import CallError
from worker.tencent.signing import SIGNED_HEADERS, sign, utc_date

ACTION: Final = "RecognizeMacaoIDCardOCR"
VERSION: Final = "2018-11-19"
SERVICE: Final = "ocr"
MAX_BODY_BYTES: Final = 10 * 1024 * 1024

_AUTH_RE: Final = re.compile(
    r"^TC3-HMAC-SHA256 Credential=(?P<sid>[^/\s]+)/(?P<date>[^/\s]+)/(?P<service>[^/\s]+)"
    r"/tc3_request,\s*SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<sig>[0-9a-fA-F]+)$"
)


def check_method_path(method: str, path: str) -> None:
    """Only `POST /` is the API."""
    if method != "POST":
        raise CallError(
            "UnsupportedProtocol",
            f"HTTP method {method} is not supported: this API takes POST with a JSON body.",
        )
    if path != "/":
        raise CallError(
            "UnsupportedProtocol", f"The request path {path!r} is not supported; use /."
        )


def check_content_type(content_type: str | None) -> None:
    """TC3 JSON calls must say application/json (a charset parameter is fine)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise CallError(
            "InvalidParameter",
            f"Content-Type {content_type or '(none)'!r} is not supported; "
            "send application/json with TC3-HMAC-SHA256.",
        )


def check_action_version(headers: Mapping[str, str]) -> None:
    """X-TC-Action and X-TC-Version must name this action."""
    action = headers.get("X-TC-Action")
    if not action:
        raise CallError("MissingParameter", "The request is missing a required parameter `Action`.")
    if action != ACTION:
        raise CallError("InvalidAction", f"The action {action!r} does not exist.")
    version = headers.get("X-TC-Version")
    if not version:
        raise CallError(
            "MissingParameter", "The request is missing a required parameter `Version`."
        )
    if version != VERSION:
        raise CallError("NoSuchVersion", f"The API version {version!r} does not exist.")


def check_body_size(size: int) -> None:
    """A TC3 POST body is at most 10 MB."""
    if size > MAX_BODY_BYTES:
        raise CallError(
            "RequestSizeLimitExceeded",
            f"The request body is {size} bytes; the limit is {MAX_BODY_BYTES} bytes.",
        )


def check_timestamp(raw: str | None, now_s: float, skew_s: int) -> int:
    """X-TC-Timestamp must be integer seconds within `skew_s` of the server clock."""
    if not raw:
        raise CallError(
            "MissingParameter", "The request is missing a required parameter `Timestamp`."
        )
    try:
        timestamp = int(raw)
    except ValueError:
        raise CallError(
            "InvalidParameter", "The parameter `Timestamp` must be an integer."
        ) from None
    if abs(now_s - timestamp) > skew_s:
        raise CallError(
            "AuthFailure.SignatureExpire",
            "The signature has expired: the request timestamp is more than "
            f"{skew_s} seconds away from the server time.",
        )
    return timestamp


@dataclass(frozen=True)
class Caller:
    """Who signed the call."""

    secret_id: str
    timestamp: int


def check_signature(
    *,
    authorization: str | None,
    credentials: Mapping[str, str],
    host: str,
    content_type: str,
    body: bytes,
    timestamp: int,
) -> Caller:
    """Verify the TC3 signature against the Host and Content-Type exactly as received."""
    if not authorization:
        raise CallError(
            "AuthFailure.InvalidAuthorization", "The request has no Authorization header."
        )
    match = _AUTH_RE.match(authorization.strip())
    if match is None:
        raise CallError(
            "AuthFailure.InvalidAuthorization",
            "The Authorization header does not follow TC3-HMAC-SHA256.",
        )
    secret_id = match["sid"]
    secret_key = credentials.get(secret_id)
    if secret_key is None:
        raise CallError("AuthFailure.SecretIdNotFound", "The SecretId is not found.")
    failure = CallError(
        "AuthFailure.SignatureFailure",
        "The provided credentials could not be validated. Please check your signature is correct.",
    )
    if match["date"] != utc_date(timestamp) or match["service"] != SERVICE:
        raise failure
    if match["signed"].lower() != SIGNED_HEADERS:
        raise failure
    expected = sign(
        secret_id=secret_id,
        secret_key=secret_key,
        service=SERVICE,
        host=host,
        content_type=content_type,
        body=body,
        timestamp=timestamp,
    )
    if not hmac.compare_digest(expected.signature, match["sig"].lower()):
        raise failure
    return Caller(secret_id=secret_id, timestamp=timestamp)
