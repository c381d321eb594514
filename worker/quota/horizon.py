"""A per-process queue in front of the shared limiter: slots are booked only a short horizon
ahead.

Why: a rate decrease after a throttle only shapes the slots booked after it. Had every
waiting job booked its slot the moment it arrived (up to `max_quota_wait_s` ahead), a quota
lower than configured would go on being overrun for that long after the first throttle. So a
slot is booked at most `horizon_s` before it is used; a job that must wait longer waits here,
in FIFO order per key, and only the head of the queue talks to Redis: a thousand waiting
jobs cost about one round trip per slot, not a thousand.

A newcomer (a job asking for the first time) that finds no slot within the horizon is given
its turn in the fleet's line by the shared limiter (`RateLimiter.reserve(newcomer=True)`):
how long until every job of every process that asked before it has had its slot. A turn
within the job's wait is waited for here, asleep (no round trip until then); a later one
goes back to the caller, which defers the job in SQL to just before it. At its turn the job
asks again as a holder of its place, through this queue. Turns from the shared line, not
from this process's own grant rate, are what let a fleet drain a backlog at the full quota
to its last job: a process cannot see how many jobs the others hold, so its own estimate
sent deferred jobs back too late (a trickle at the end of a backlog) or too early (jobs
cycling through the database, CPU growing with the backlog).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from worker.quota.limiter import RateLimiter, Reservation

# Grants remembered to estimate this process's rate (for a waiter that gives up in the queue).
RECENT_GRANTS = 64


@dataclass
class _Queue:
    """One key's FIFO of holders: a lock, how many wait for it, recent grant times."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    grants: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_GRANTS))

    def rate(self, now: float) -> float | None:
        """This process's recent grants per second, or None without enough history."""
        if len(self.grants) >= 2 and now > self.grants[0]:
            return (len(self.grants) - 1) / (now - self.grants[0])
        return None


def _from_answer(answer: Reservation, start: float, asked: float, answered: float) -> Reservation:
    """A grant in the caller's terms: its wait from `start`, the latest the slot can be.

    The shared limiter read its clock somewhere between `asked` and `answered`, so the slot
    is at most `answered + wait_s` and its window ends at least `slack_s - (answered - asked)`
    after it. Counting from the answer never sends a call before its slot: a window's first
    slot sits half a slot after the window's start, and a call leaving early is counted in
    the window before, which is full (measured at 50/s on a loaded machine: 3 throttled calls
    in 20,000, each sent 0-6 ms before its window when counted from the question). Late is
    the safe side: the last slot leaves the window's edge margin, and the caller takes a
    fresh slot rather than leave past the slack."""
    round_trip_s = answered - asked
    return replace(
        answer,
        wait_s=answered - start + answer.wait_s,
        slack_s=answer.slack_s - round_trip_s,
    )


class HorizonLimiter:
    """Wraps any RateLimiter; same interface. A granted wait counts from the caller's request
    (the caller adds it to the time it asked) and includes the round trip to the shared
    limiter (`_from_answer`); a refusal's wait counts from the answer."""

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

    async def reserve(self, key: str, *, max_wait_s: float, newcomer: bool = False) -> Reservation:
        """A slot at most `max_wait_s` from now, booked no more than the horizon ahead. A
        newcomer whose turn in the fleet's line is further than that is refused with it."""
        start = self._clock()
        deadline = start + max_wait_s
        if newcomer:
            answer = await self._inner.reserve(
                key, max_wait_s=min(self._horizon_s, max_wait_s), newcomer=True
            )
            if answer.granted:
                self._queues.setdefault(key, _Queue()).grants.append(start + answer.wait_s)
                return _from_answer(answer, start, start, self._clock())
            turn = start + answer.wait_s
            if turn > deadline:
                return answer  # the caller defers the job to its turn
            # Asleep until the turn is within the horizon; then a holder like any other.
            await self._sleep(max(0.0, turn - self._horizon_s - self._clock()))
        return await self._hold(key, start, deadline)

    async def _hold(self, key: str, start: float, deadline: float) -> Reservation:
        """A holder's slot, through this process's FIFO (only its head asks the limiter)."""
        queue = self._queues.setdefault(key, _Queue())
        ahead = await self._wait_for_head(queue, deadline)
        if ahead is not None:
            # The queue ahead of us was longer than we may wait: the caller defers the job
            # by about the time this process needs to serve those ahead of it.
            return Reservation(False, (ahead + 1) / (queue.rate(self._clock()) or 1.0), 0.0)
        try:
            while True:
                asked = self._clock()
                remaining = max(0.0, deadline - asked)
                answer = await self._inner.reserve(key, max_wait_s=min(self._horizon_s, remaining))
                if answer.granted:
                    if not queue.waiting:
                        # Nobody behind us: the rate measured so far ends here, so an idle
                        # spell never passes for a slow quota.
                        queue.grants.clear()
                    queue.grants.append(asked + answer.wait_s)
                    return _from_answer(answer, start, asked, self._clock())
                if answer.wait_s > remaining:
                    return answer
                # Refused within our deadline means the slot is beyond the horizon: come back
                # when it is within it (others may take it first; then we hear of the next).
                await self._sleep(max(answer.wait_s - self._horizon_s, 0.001))
        finally:
            queue.lock.release()

    async def _wait_for_head(self, queue: _Queue, deadline: float) -> int | None:
        """Wait to be the head (None: we hold the lock), or how many were ahead at the
        deadline."""
        if not queue.lock.locked() and not queue.waiting:
            await queue.lock.acquire()  # free: taken at once, nobody to queue behind
            return None
        queue.waiting += 1
        acquire = asyncio.ensure_future(queue.lock.acquire())
        try:
            timeout_s = max(0.0, deadline - self._clock())
            await asyncio.wait({acquire}, timeout=timeout_s)
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                queue.lock.release()
            raise
        finally:
            queue.waiting -= 1
            if not acquire.done():
                # A cancelled acquire never takes the lock; a wake-up it got but can no
                # longer use goes to the next waiter (asyncio.Lock does that).
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            return None
        return queue.waiting

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        """Passed through: the shared rate steps down for every process."""
        return await self._inner.throttled(key, window=window, window_cap=window_cap)

    async def effective_rate(self, key: str) -> float:
        """Passed through."""
        return await self._inner.effective_rate(key)
