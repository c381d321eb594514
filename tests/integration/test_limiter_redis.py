"""What only the Redis limiter has: one round trip, a documented script, the sync reader,
expiring state. REAL Redis through `clean_redis`."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pytest

from worker.quota.limiter import limiter_key
from worker.quota.limiter_redis import (
    ARGV_CONTROL_FIELDS,
    RedisRateLimiter,
    effective_rate_sync,
    lua_source,
)
from worker.quota.state import state_redis
from worker.settings import Settings

KEY = limiter_key("AKIDREDIS", "RecognizeMacaoIDCardOCR", "https://ocr.test")


def test_the_script_header_documents_keys_and_every_argv_in_order() -> None:
    header = lua_source().split("]]", 1)[0]
    assert "KEYS[1]" in header
    documented = dict(re.findall(r"^ARGV\[(\d+)\]\s+(\w+)", header, flags=re.MULTILINE))
    assert documented["1"] == "operation"
    assert [documented[str(i)] for i in range(2, 2 + len(ARGV_CONTROL_FIELDS))] == list(
        ARGV_CONTROL_FIELDS
    )
    assert documented[str(2 + len(ARGV_CONTROL_FIELDS))] == "max_wait_s"


async def test_each_reservation_is_one_round_trip(clean_redis: str) -> None:
    client = state_redis(clean_redis)
    limiter = RedisRateLimiter(client, qps=5)
    await limiter.reserve(KEY, max_wait_s=60)  # may load the script (NOSCRIPT) once
    sent: list[Any] = []
    original: Any = client.execute_command

    async def spy(*args: Any, **options: Any) -> Any:
        sent.append(args[0])
        return await original(*args, **options)

    client.execute_command = spy  # type: ignore[method-assign]
    try:
        for _ in range(10):
            await limiter.reserve(KEY, max_wait_s=60)
        await limiter.throttled(KEY)
        await limiter.effective_rate(KEY)
    finally:
        await client.aclose()
    assert sent == ["EVALSHA"] * 12


async def test_state_goes_idle_after_its_schedule_and_its_key_is_kept_a_day(
    clean_redis: str,
) -> None:
    client = state_redis(clean_redis)
    try:
        limiter = RedisRateLimiter(client, qps=5)
        for _ in range(10):
            await limiter.reserve(KEY, max_wait_s=60)
        seconds, micros = await client.time()
        idle_at = await client.hget(KEY, "idle_at")
        assert idle_at is not None
        idle_in_s = float(idle_at) - (seconds + micros / 1e6)
        # Beyond the ~2 s of booked slots, but not forever.
        assert 2 < idle_in_s <= 5 * 60
        ttl_ms = await client.pttl(KEY)
        assert 86_400_000 < ttl_ms <= (86_400 + 5 * 60) * 1000
    finally:
        await client.aclose()


async def test_an_idle_state_restarts_at_once_a_missing_one_after_the_guard(
    clean_redis: str,
) -> None:
    """Idle (past idle_at): nothing of it is booked, the first slot is in this window.
    Missing (Redis lost it): its bookings may still be on their way, so not before the
    window after now + lost_state_guard_s."""
    client = state_redis(clean_redis)
    try:
        limiter = RedisRateLimiter(client, qps=5, tuning={"lost_state_guard_s": 0.5})
        for _ in range(10):  # booked ~2 s ahead
            await limiter.reserve(KEY, max_wait_s=60)
        await client.hset(KEY, "idle_at", "1")  # as if its idle spell were over
        idle = await limiter.reserve(KEY, max_wait_s=60)
        assert idle.granted and idle.wait_s <= 0.2 + 0.03
        await client.delete(KEY)
        seconds, micros = await client.time()
        now = seconds + micros / 1e6
        lost = await limiter.reserve(KEY, max_wait_s=60)
        assert lost.granted and lost.window is not None
        assert lost.window >= int(now + 0.5) + 1
    finally:
        await client.aclose()


async def test_sync_reader_sees_the_shared_rate(clean_redis: str) -> None:
    assert effective_rate_sync(clean_redis, KEY) is None
    client = state_redis(clean_redis)
    try:
        limiter = RedisRateLimiter(client, qps=10)
        await limiter.reserve(KEY, max_wait_s=60)
        assert effective_rate_sync(clean_redis, KEY) == pytest.approx(10)
        await limiter.throttled(KEY)
        assert effective_rate_sync(clean_redis, KEY) == pytest.approx(9)
        assert await limiter.effective_rate(KEY) == pytest.approx(9)
    finally:
        await client.aclose()


async def test_from_settings_uses_the_quota_knobs(clean_redis: str) -> None:
    settings = Settings(qps=4, burst=1, rate_min_fraction=0.9, broker_url=clean_redis)
    client = state_redis(settings.state_redis_url)
    try:
        limiter = RedisRateLimiter.from_settings(settings, client)
        assert await limiter.effective_rate(KEY) == 4
        # 4 x 0.9 = 3.6, which is also the floor (0.9 x 4): 3 whole slots per window.
        assert await limiter.throttled(KEY) == pytest.approx(3)
        unlimited = RedisRateLimiter.from_settings(Settings(qps=0), client)
        assert (await unlimited.reserve(KEY, max_wait_s=0)).wait_s == 0
    finally:
        await client.aclose()


async def test_from_settings_passes_the_edge_margin_to_the_schedule(clean_redis: str) -> None:
    # One window of 20 slots: a 0.3 s margin puts the last one at 0.7 s at the latest
    # (the default 0.05 s would allow 0.95 s).
    settings = Settings(qps=20, quota_edge_margin_s=0.3, broker_url=clean_redis)
    client = state_redis(settings.state_redis_url)
    try:
        limiter = RedisRateLimiter.from_settings(settings, client)
        sends = []
        for _ in range(45):
            before = time.time()
            reservation = await limiter.reserve(KEY, max_wait_s=60)
            sends.append(before + reservation.wait_s)
        assert max(t - math.floor(t) for t in sends) <= 0.7 + 0.03
    finally:
        await client.aclose()
