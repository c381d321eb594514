"""The in-memory twin of the Redis limiter: one process, same schedule, injectable clock.

For unit tests and simulations; a fleet must share `worker.quota.limiter_redis.RedisRateLimiter`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from worker.quota import aimd
from worker.quota.limiter import Reservation


class MemoryRateLimiter:
    """`RateLimiter` kept in a dict. `qps == 0` means unlimited.

    The default clock is wall time rather than monotonic so that windows line up with
    whole seconds, as the API's do (the Redis backend uses Redis TIME for the same reason).
    `tuning` overrides `worker.quota.aimd.RateControl` constants (simulations, tests)."""

    def __init__(
        self,
        qps: float,
        burst: int = 1,
        clock: Callable[[], float] = time.time,
        *,
        min_rate_fraction: float = 0.2,
        tuning: Mapping[str, Any] | None = None,
    ) -> None:
        self._control = aimd.control_for(qps, burst, min_rate_fraction, tuning)
        self.qps = qps
        self._clock = clock
        self._states: dict[str, aimd.QuotaState] = {}
        # Methods never await while holding state, but threads may share one instance.
        self._lock = threading.Lock()

    def _state(self, key: str, ctl: aimd.RateControl) -> aimd.QuotaState:
        return self._states.get(key) or aimd.initial_state(ctl)

    async def reserve(self, key: str, *, max_wait_s: float) -> Reservation:
        """Take the next slot for `key` if it is at most `max_wait_s` away."""
        ctl = self._control
        if ctl is None:
            return Reservation(granted=True, wait_s=0.0)
        with self._lock:
            now = self._clock()
            state = self._states[key] = aimd.stamp(self._state(key, ctl), ctl, now)
            new, wait_s = aimd.reserve(state, ctl, now, max_wait_s)
            if new is None:
                return Reservation(granted=False, wait_s=wait_s, slack_s=0.0)
            self._states[key] = new
        return Reservation(
            granted=True,
            wait_s=wait_s,
            slack_s=new.win + 1 - (now + wait_s),
            window=new.win,
            window_cap=new.cap,
        )

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        """Record a throttle answer for `key`; returns the rate now in force."""
        ctl = self._control
        if ctl is None:
            return math.inf
        with self._lock:
            now = self._clock()
            new, rate = aimd.throttled(self._state(key, ctl), ctl, now, window, window_cap)
            self._states[key] = new
        return rate

    async def effective_rate(self, key: str) -> float:
        """Calls per second currently allowed for `key` (inf when unlimited)."""
        ctl = self._control
        if ctl is None:
            return math.inf
        with self._lock:
            return aimd.effective_rate(self._state(key, ctl), ctl, self._clock())
