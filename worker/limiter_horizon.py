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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from worker.limiter import RateLimiter, Reservation

# Grants remembered to estimate this process's share of the quota.
RECENT_GRANTS = 64


@dataclass
class _Queue:
    """One key's FIFO: a lock, recent grant times, and refusals since the last grant."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    grants: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_GRANTS))
    refused: int = 0

    def turn_in_s(self, slot_in_s: float, now: float) -> float:
        """When a job turned away now should come back: after the next slot, plus one slot
        of this process's recent grant rate for every job turned away before it since the
        last grant. Jobs that give up together come back spread over the time the queue
        needs to serve them, so the queue never runs dry and never floods."""
        self.refused += 1
        if len(self.grants) >= 2 and now > self.grants[0]:
            rate = (len(self.grants) - 1) / (now - self.grants[0])
        else:
            rate = 1.0  # no history yet: assume one slot a second
        return max(slot_in_s, 0.0) + self.refused / rate


class HorizonLimiter:
    """Wraps any RateLimiter; same interface. A granted wait counts from the caller's request
    (the caller adds it to the time it asked); a refusal's wait counts from the answer."""

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
        self._queues: dict[str, _Queue] = {}

    async def reserve(self, key: str, *, max_wait_s: float) -> Reservation:
        """A slot at most `max_wait_s` from now, booked no more than the horizon ahead."""
        start = self._clock()
        deadline = start + max_wait_s
        queue = self._queues.setdefault(key, _Queue())
        try:
            async with asyncio.timeout(max_wait_s):
                await queue.lock.acquire()
        except TimeoutError:
            # The queue ahead of us is longer than we may wait: the caller defers the job
            # until about when its turn would have come.
            return Reservation(False, queue.turn_in_s(0.0, self._clock()), 0.0)
        try:
            while True:
                asked = self._clock()
                remaining = max(0.0, deadline - asked)
                answer = await self._inner.reserve(key, max_wait_s=min(self._horizon_s, remaining))
                waited = asked - start
                if answer.granted:
                    queue.grants.append(asked + answer.wait_s)
                    queue.refused = 0
                    return replace(answer, wait_s=waited + answer.wait_s)
                if answer.wait_s > remaining:
                    return Reservation(False, queue.turn_in_s(answer.wait_s, asked), 0.0)
                # Refused within our deadline means the slot is beyond the horizon: come back
                # when it is within it (others may take it first; then we hear of the next).
                await self._sleep(max(answer.wait_s - self._horizon_s, 0.001))
        finally:
            queue.lock.release()

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        """Passed through: the shared rate steps down for every process."""
        return await self._inner.throttled(key, window=window, window_cap=window_cap)

    async def effective_rate(self, key: str) -> float:
        """Passed through."""
        return await self._inner.effective_rate(key)
