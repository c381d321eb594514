"""TC3-HMAC-SHA256, exactly as Tencent's SDK builds it (reference section 2)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime

ALGORITHM = "TC3-HMAC-SHA256"
SIGNED_HEADERS = "content-type;host"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_date(timestamp: int) -> str:
    """The UTC calendar date of a Unix timestamp, as the credential scope wants it."""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Signature:
    """The pieces of one signature; intermediate hashes are kept for tests and debugging."""

    authorization: str
    signature: str
    payload_hash: str
    canonical_request_hash: str


def canonical_request(content_type: str, host: str, payload_hash: str) -> str:
    headers = f"content-type:{content_type}\nhost:{host}\n"
    return f"POST\n/\n\n{headers}\n{SIGNED_HEADERS}\n{payload_hash}"


def sign(
    *,
    secret_id: str,
    secret_key: str,
    service: str,
    host: str,
    content_type: str,
    body: bytes,
    timestamp: int,
) -> Signature:
    """Sign one POST / request whose body is exactly `body`."""
    date = utc_date(timestamp)
    payload_hash = sha256_hex(body)
    creq_hash = sha256_hex(canonical_request(content_type, host, payload_hash).encode("utf-8"))
    scope = f"{date}/{service}/tc3_request"
    string_to_sign = f"{ALGORITHM}\n{timestamp}\n{scope}\n{creq_hash}"
    k_date = _hmac(("TC3" + secret_key).encode("utf-8"), date)
    k_service = _hmac(k_date, service)
    k_signing = _hmac(k_service, "tc3_request")
    signature = hmac.new(k_signing, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    authorization = (
        f"{ALGORITHM} Credential={secret_id}/{scope}, "
        f"SignedHeaders={SIGNED_HEADERS}, Signature={signature}"
    )
    return Signature(authorization, signature, payload_hash, creq_hash)
