"""Standard Webhooks signing (https://www.standardwebhooks.com/): secrets, headers, body.

`webhook-signature` is `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`,
the key being the secret's base64 part decoded. While a rotated-out secret is still valid,
the message carries one signature per secret, space-separated, so a receiver holding either
verifies it (the `standardwebhooks` library accepts any matching one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
SECRET_BYTES = 32  # the specification asks for 24 to 64


def new_secret() -> str:
    """A fresh `whsec_...` signing secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def signature(secrets_in_use: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<sig>` per secret, space-separated."""
    if not secrets_in_use:
        raise ValueError("no signing secret")
    content = f"{msg_id}.{timestamp}.".encode() + body
    parts = []
    for secret in secrets_in_use:
        digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
        parts.append("v1," + base64.b64encode(digest).decode())
    return " ".join(parts)


def headers(
    secrets_in_use: Sequence[str], msg_id: str, body: bytes, *, now: datetime
) -> dict[str, str]:
    """The request headers of one attempt (a fresh timestamp each time, same id and body)."""
    timestamp = int(now.timestamp())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_in_use, msg_id, timestamp, body),
    }


def iso(value: datetime) -> str:
    """UTC ISO 8601 with a Z, as the specification's examples."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def body(event_type: str, created_at: datetime, data: dict[str, Any]) -> bytes:
    """`{"type", "timestamp", "data"}`, compact JSON (the bytes that are signed)."""
    payload = {"type": event_type, "timestamp": iso(created_at), "data": data}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
