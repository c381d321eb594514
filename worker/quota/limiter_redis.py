"""The shared quota limiter: one schedule in Redis for every worker process on every host.

Each call is ONE round trip: EVALSHA of `worker/quota/ratelimit.lua` (redis-py's registered
script falls back to SCRIPT LOAD on NOSCRIPT). The script reads Redis TIME, so hosts' clocks do not
matter. Fails closed: if Redis cannot be reached, `StateUnavailable` is raised and no call
may go out.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from worker.quota import aimd
from worker.quota.limiter import Reservation
from worker.quota.state import STATE_ERRORS, state_redis_kwargs, unavailable

if TYPE_CHECKING:
    from worker.settings import Settings


@functools.cache
def lua_source() -> str:
    """The limiter script (shipped as package data)."""
    return importlib.resources.files("worker.quota").joinpath("ratelimit.lua").read_text("utf-8")


# ARGV[2..] of ratelimit.lua, in order (its header documents the same list).
ARGV_CONTROL_FIELDS = (
    "qps",
    "burst",
    "min_rate_fraction",
    "decrease_factor",
    "increase_fraction_per_s",
    "coalesce_s",
    "probe_settle_s",
    "probe_gap_min_s",
    "probe_gap_max_s",
    "lost_state_guard_s",
)


class RedisRateLimiter:
    """`RateLimiter` shared through Redis. `qps == 0` means unlimited (no round trip)."""

    def __init__(
        self,
        redis_client: redis.asyncio.Redis,
        *,
        qps: float,
        burst: int = 1,
        min_rate_fraction: float = 0.2,
        tuning: Mapping[str, Any] | None = None,
    ) -> None:
        self._control = aimd.control_for(qps, burst, min_rate_fraction, tuning)
        self.qps = qps
        self._redis = redis_client
        self._script = redis_client.register_script(lua_source())

    @classmethod
    def from_settings(
        cls, settings: Settings, redis_client: redis.asyncio.Redis
    ) -> RedisRateLimiter:
        """The limiter configured by `qps`, `burst`, `rate_min_fraction` and
        `quota_edge_margin_s`; a lost state's bookings reach `quota_horizon_s` ahead
        (worker.quota.horizon books no further)."""
        return cls(
            redis_client,
            qps=settings.qps,
            burst=settings.burst,
            min_rate_fraction=settings.rate_min_fraction,
            tuning={
                "lost_state_guard_s": settings.quota_horizon_s,
                "edge_margin_s": settings.quota_edge_margin_s,
            },
        )

    def _args(self, op: str, ctl: aimd.RateControl, *extra: float) -> list[str | float]:
        return [op, *(getattr(ctl, name) for name in ARGV_CONTROL_FIELDS), *extra]

    async def _run(self, key: str, args: Sequence[str | float]) -> Any:
        try:
            return await self._script(keys=[key], args=args)
        except STATE_ERRORS as exc:
            raise unavailable(exc, "the quota state") from None

    async def reserve(self, key: str, *, max_wait_s: float, newcomer: bool = False) -> Reservation:
        """Take the next slot for `key` if it is at most `max_wait_s` away, or hand a
        newcomer its turn in the line (one round trip)."""
        ctl = self._control
        if ctl is None:
            return Reservation(granted=True, wait_s=0.0)
        # ARGV[13], ARGV[14] are the throttle's evidence, unused by "reserve" (0); ARGV[15]
        # says whether the caller is a newcomer to the line; ARGV[16] is the edge margin.
        granted, wait_s, slack_s, window, window_cap = await self._run(
            key, self._args("reserve", ctl, max_wait_s, 0, 0, int(newcomer), ctl.edge_margin_s)
        )
        if not int(granted):
            return Reservation(granted=False, wait_s=float(wait_s), slack_s=float(slack_s))
        return Reservation(
            granted=True,
            wait_s=float(wait_s),
            slack_s=float(slack_s),
            window=int(window),
            window_cap=int(window_cap),
        )

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        """Record a throttle answer for `key`; returns the rate now in force."""
        ctl = self._control
        if ctl is None:
            return math.inf
        evidence = (window, window_cap) if window is not None else (0, 0)
        # ARGV[12] is max_wait_s for "reserve"; "throttled" leaves it unused (0).
        return float(await self._run(key, self._args("throttled", ctl, 0, *evidence)))

    async def effective_rate(self, key: str) -> float:
        """Calls per second currently allowed for `key` (inf when unlimited)."""
        ctl = self._control
        if ctl is None:
            return math.inf
        rate = await self._run(key, ["rate"])
        return ctl.qps if rate is None else float(rate)


def effective_rate_sync(redis_url: str, key: str) -> float | None:
    """For operators and metrics: the shared rate for `key`, None when it has no state."""
    client = redis.Redis.from_url(redis_url, **state_redis_kwargs())
    try:
        rate = client.register_script(lua_source())(keys=[key], args=["rate"])
    except STATE_ERRORS as exc:
        raise unavailable(exc, "the quota state") from None
    finally:
        client.close()
    return None if rate is None else float(rate)
