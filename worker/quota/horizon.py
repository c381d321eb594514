"""A per-process queue in front of the shared limiter: slots are booked only a short horizon
ahead.

Why: a rate decrease after a throttle only shapes the slots booked after it. Had every
waiting job booked its slot the moment it arrived (up to `max_quota_wait_s` ahead), a quota
lower than configured would go on being overrun for that long after the first throttle. So a
slot is booked at most `horizon_s` before it is used; a job that must wait longer waits here,
in FIFO order per key, and only the head of the queue talks to Redis: a thousand waiting
jobs cost about one round trip per slot, not a thousand.

A job whose place in the queue puts its turn past its deadline is told so as soon as that is
known (at every grant, from this process's recent grant rate), with the turn its place gives
it, not when its deadline comes. Otherwise jobs that arrived together (a fleet starting on a
backlog) would all give up at one instant, and the queue would stand empty until the first of
them came back through the database and the sweeper: seconds of unused quota.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from worker.quota.limiter import RateLimiter, Reservation

# Grants remembered to estimate this process's share of the quota.
RECENT_GRANTS = 64
# Grants needed before the rate is trusted to send waiters away early.
MIN_GRANTS_TO_SHED = 4


@dataclass(eq=False)
class _Waiter:
    """One job waiting for the head of the queue; `told` carries an early refusal's turn."""

    deadline: float
    told: asyncio.Future[float]


@dataclass
class _Queue:
    """One key's FIFO: a lock, its waiters, recent grant times, refusals since the last grant."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: list[_Waiter] = field(default_factory=list)
    grants: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_GRANTS))
    refused: int = 0

    def rate(self, now: float) -> float | None:
        """This process's recent grants per second, or None without enough history."""
        if len(self.grants) >= 2 and now > self.grants[0]:
            return (len(self.grants) - 1) / (now - self.grants[0])
        return None

    def turn_in_s(self, slot_in_s: float, now: float, ahead: int = 0) -> float:
        """When a job turned away now should come back: after the next slot, plus one slot
        of this process's recent grant rate for every job turned away before it since the
        last grant and every job still waiting ahead of it. Jobs that give up together come
        back spread over the time the queue needs to serve them, so the queue never runs
        dry and never floods."""
        self.refused += 1
        rate = self.rate(now) or 1.0  # no history yet: assume one slot a second
        return max(slot_in_s, 0.0) + (self.refused + ahead) / rate

    def shed(self, now: float) -> None:
        """Tell every waiter whose place puts its turn past its deadline, with that turn.

        A place counts everyone ahead, those told to go included: they come back in the
        same order, so their turns come first."""
        rate = self.rate(now)
        if rate is None or len(self.grants) < MIN_GRANTS_TO_SHED:
            return
        for place, waiter in enumerate(self.waiting, start=1):
            turn_s = place / rate
            if not waiter.told.done() and now + turn_s > waiter.deadline:
                waiter.told.set_result(turn_s)


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
        early = await self._wait_for_head(queue, deadline, max_wait_s)
        if early is not None:
            return early
        try:
            while True:
                asked = self._clock()
                remaining = max(0.0, deadline - asked)
                answer = await self._inner.reserve(key, max_wait_s=min(self._horizon_s, remaining))
                waited = asked - start
                if answer.granted:
                    if not queue.waiting:
                        # Nobody behind us: the rate measured so far ends here, so an idle
                        # spell never passes for a slow quota (and sends a burst away).
                        queue.grants.clear()
                    queue.grants.append(asked + answer.wait_s)
                    queue.refused = 0
                    queue.shed(asked)
                    return replace(answer, wait_s=waited + answer.wait_s)
                if answer.wait_s > remaining:
                    return Reservation(False, queue.turn_in_s(answer.wait_s, asked), 0.0)
                # Refused within our deadline means the slot is beyond the horizon: come back
                # when it is within it (others may take it first; then we hear of the next).
                await self._sleep(max(answer.wait_s - self._horizon_s, 0.001))
        finally:
            queue.lock.release()

    async def _wait_for_head(
        self, queue: _Queue, deadline: float, max_wait_s: float
    ) -> Reservation | None:
        """Wait to be the head (None: we hold the lock), or the refusal to return."""
        if not queue.lock.locked() and not queue.waiting:
            await queue.lock.acquire()  # free: taken at once, nobody to queue behind
            return None
        waiter = _Waiter(deadline, asyncio.get_running_loop().create_future())
        queue.waiting.append(waiter)
        acquire = asyncio.ensure_future(queue.lock.acquire())
        futures: set[asyncio.Future[Any]] = {acquire, waiter.told}
        try:
            await asyncio.wait(futures, timeout=max_wait_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                queue.lock.release()
            raise
        finally:
            ahead = queue.waiting.index(waiter)
            queue.waiting.remove(waiter)
            if not acquire.done():
                # A cancelled acquire never takes the lock; a wake-up it got but can no
                # longer use goes to the next waiter (asyncio.Lock does that).
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            return None  # the lock is ours, even if we were told to go at the same moment
        if waiter.told.done():
            return Reservation(False, waiter.told.result(), 0.0)
        # The queue ahead of us was longer than we may wait: the caller defers the job until
        # about when its turn would have come.
        return Reservation(False, queue.turn_in_s(0.0, self._clock(), ahead), 0.0)

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        """Passed through: the shared rate steps down for every process."""
        return await self._inner.throttled(key, window=window, window_cap=window_cap)

    async def effective_rate(self, key: str) -> float:
        """Passed through."""
        return await self._inner.effective_rate(key)
