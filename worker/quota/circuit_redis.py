"""The account circuit shared through Redis: one pause for every worker on every host.

The pause is one key written with SET NX (exactly one opener logs loudly); the probe claim
is SET NX PX (exactly one caller per interval across the fleet). Fails closed: Redis out of
reach raises `StateUnavailable`, and the caller keeps the job waiting.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import redis
import redis.asyncio

from worker.quota.circuit import Pause
from worker.quota.state import STATE_ERRORS, state_redis_kwargs, unavailable

DEFAULT_KEY_PREFIX = "macao-ocr:circuit"


def _encode(pause: Pause) -> str:
    return json.dumps(
        {"code": pause.code, "message": pause.message, "since": pause.since.isoformat()}
    )


def _decode(raw: bytes | str | None) -> Pause | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return Pause(
        code=str(data["code"]),
        message=str(data["message"]),
        since=datetime.fromisoformat(data["since"]),
    )


class RedisAccountCircuit:
    """`AccountCircuit` kept under `key_prefix` in Redis."""

    def __init__(
        self, redis_client: redis.asyncio.Redis, key_prefix: str = DEFAULT_KEY_PREFIX
    ) -> None:
        self._redis = redis_client
        self.pause_key = f"{key_prefix}:pause"
        self.probe_key = f"{key_prefix}:probe"

    async def pause(self) -> Pause | None:
        """The current pause, or None when calls may go out."""
        try:
            raw = await self._redis.get(self.pause_key)
        except STATE_ERRORS as exc:
            raise unavailable(exc, "the account circuit") from None
        return _decode(raw)

    async def open(self, code: str, message: str) -> bool:
        """Pause all calls; True only for the caller whose write opened it."""
        pause = Pause(code=code, message=message, since=datetime.now(UTC))
        try:
            created = await self._redis.set(self.pause_key, _encode(pause), nx=True)
        except STATE_ERRORS as exc:
            raise unavailable(exc, "the account circuit") from None
        return bool(created)

    async def close(self) -> None:
        """Resume calls; the next opening starts with a fresh probe interval."""
        try:
            await self._redis.delete(self.pause_key, self.probe_key)
        except STATE_ERRORS as exc:
            raise unavailable(exc, "the account circuit") from None

    async def claim_probe(self, interval_s: float) -> bool:
        """True for exactly one caller per `interval_s` across the fleet."""
        interval_ms = max(1, math.ceil(interval_s * 1000))
        try:
            claimed = await self._redis.set(self.probe_key, "1", nx=True, px=interval_ms)
        except STATE_ERRORS as exc:
            raise unavailable(exc, "the account circuit") from None
        return bool(claimed)


def read_pause_sync(redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> Pause | None:
    """For the CLI (`macao-ocr status`): the fleet's pause and its reason, or None."""
    client = redis.Redis.from_url(redis_url, **state_redis_kwargs())
    try:
        raw = client.get(f"{key_prefix}:pause")
    except STATE_ERRORS as exc:
        raise unavailable(exc, "the account circuit") from None
    finally:
        client.close()
    return _decode(raw)
