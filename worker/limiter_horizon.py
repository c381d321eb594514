"""A per-process queue in front of the shared limiter: slots are booked only a short horizon
ahead.

Why: a rate decrease after a throttle only shapes the slots booked after it. Had every
waiting job booked its slot the moment it arrived (up to `max_quota_wait_s` ahead), a quota
lower than configured would go on being overrun for that long after the first throttle. So a
slot is booked at most `horizon_s` before it is used; a job that must wait longer waits here,
in FIFO order per key, and only the head of the queue talks to Redis: a thousand waiting
jobs cost about one round trip per slot, not a thousand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from worker.limiter import RateLimiter, Reservation


class HorizonLimiter:
    """Wraps any RateLimiter; same interface. Waits are counted from the caller's request."""

    def __init__(
        self,
        inner: RateLimiter,
        *,
        horizon_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")
        self._inner = inner
        self._horizon_s = horizon_s
        self._clock = clock
        self._sleep = sleep
        self._queues: dict[str, asyncio.Lock] = {}

    async def reserve(self, key: str, *, max_wait_s: float) -> Reservation:
        """A slot at most `max_wait_s` from now, booked no more than the horizon ahead."""
        start = self._clock()
        deadline = start + max_wait_s
        queue = self._queues.setdefault(key, asyncio.Lock())
        try:
            async with asyncio.timeout(max_wait_s):
                await queue.acquire()
        except TimeoutError:
            # The queue ahead of us is longer than we may wait: the caller defers the job.
            return Reservation(granted=False, wait_s=max_wait_s, slack_s=0.0)
        try:
            while True:
                asked = self._clock()
                remaining = max(0.0, deadline - asked)
                answer = await self._inner.reserve(key, max_wait_s=min(self._horizon_s, remaining))
                waited = asked - start
                if answer.granted:
                    return Reservation(True, waited + answer.wait_s, answer.slack_s)
                if answer.wait_s > remaining:
                    return Reservation(False, waited + answer.wait_s, 0.0)
                # Refused within our deadline means the slot is beyond the horizon: come back
                # when it is within it (others may take it first; then we hear of the next).
                await self._sleep(max(answer.wait_s - self._horizon_s, 0.001))
        finally:
            queue.release()

    async def throttled(self, key: str) -> float:
        """Passed through: the shared rate steps down for every process."""
        return await self._inner.throttled(key)

    async def effective_rate(self, key: str) -> float:
        """Passed through."""
        return await self._inner.effective_rate(key)
