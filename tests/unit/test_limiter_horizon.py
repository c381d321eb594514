"""The per-process queue books slots only a short horizon ahead, in FIFO order."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from worker.quota.horizon import HorizonLimiter
from worker.quota.limiter import Reservation
from worker.quota.limiter_memory import MemoryRateLimiter

KEY = "k"


class Spy:
    """Records when each slot was booked and for when."""

    def __init__(self, qps: float) -> None:
        self.inner = MemoryRateLimiter(qps, 1)
        self.asks = 0
        self.booked: list[tuple[float, float]] = []  # (booked at, slot at)

    async def reserve(self, key: str, *, max_wait_s: float) -> Reservation:
        self.asks += 1
        now = time.time()
        answer = await self.inner.reserve(key, max_wait_s=max_wait_s)
        if answer.granted:
            self.booked.append((now, now + answer.wait_s))
        return answer

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        return await self.inner.throttled(key, window=window, window_cap=window_cap)

    async def effective_rate(self, key: str) -> float:
        return await self.inner.effective_rate(key)


async def test_slots_are_booked_no_further_ahead_than_the_horizon() -> None:
    spy = Spy(qps=20)
    limiter = HorizonLimiter(spy, horizon_s=0.1)
    start = time.time()
    answers = await asyncio.gather(*(limiter.reserve(KEY, max_wait_s=5) for _ in range(30)))
    assert all(a.granted for a in answers)
    assert max(slot - at for at, slot in spy.booked) <= 0.1 + 0.01
    # 30 slots at 20/s, all granted within ~1.5 s, each caller told its wait from its start.
    slots = sorted(start + a.wait_s for a in answers)
    assert slots[-1] - slots[0] == pytest.approx(29 / 20, abs=0.05)
    # Only the head of the queue asks: about two asks per slot, not one per waiter per slot.
    assert spy.asks <= 3 * 30


async def test_a_queue_longer_than_max_wait_defers_without_booking() -> None:
    spy = Spy(qps=5)
    limiter = HorizonLimiter(spy, horizon_s=0.1)
    answers = await asyncio.gather(*(limiter.reserve(KEY, max_wait_s=0.5) for _ in range(10)))
    granted = [a for a in answers if a.granted]
    refused = [a for a in answers if not a.granted]
    assert 2 <= len(granted) <= 4  # 5/s over half a second, give or take a slot edge
    assert len(refused) == 10 - len(granted)
    assert len(spy.booked) == len(granted)
    assert all(a.wait_s > 0 for a in refused)


async def test_keys_queue_independently() -> None:
    spy = Spy(qps=2)
    limiter = HorizonLimiter(spy, horizon_s=0.1)
    t0 = time.monotonic()
    first = await asyncio.gather(
        limiter.reserve("a", max_wait_s=2), limiter.reserve("b", max_wait_s=2)
    )
    assert all(a.granted for a in first)
    assert time.monotonic() - t0 < 0.8


def test_horizon_must_be_positive() -> None:
    with pytest.raises(ValueError, match="horizon_s"):
        HorizonLimiter(MemoryRateLimiter(5, 1), horizon_s=0)


async def test_the_head_never_spins_when_its_deadline_is_near() -> None:
    """Near the caller's deadline the next slot may be closer than the horizon yet past the
    deadline: the head must give up, not ask again in a tight loop."""
    spy = Spy(qps=2)
    limiter = HorizonLimiter(spy, horizon_s=0.5)
    answers = await asyncio.gather(*(limiter.reserve(KEY, max_wait_s=0.7) for _ in range(6)))
    assert sum(a.granted for a in answers) <= 3
    assert spy.asks <= 20


async def _come_backs(
    limiter: HorizonLimiter, jobs: int, max_wait_s: float
) -> tuple[list[tuple[int, float, float]], int]:
    """Reserve for `jobs` at once: (place, answered at, told to come back at) of each
    refusal, in arrival order, and how many were granted. Times from the burst's start."""
    t0 = time.monotonic()

    async def one(place: int) -> tuple[int, float, Reservation]:
        answer = await limiter.reserve(KEY, max_wait_s=max_wait_s)
        return place, time.monotonic() - t0, answer

    answers = await asyncio.gather(*(one(i) for i in range(jobs)))
    refused = [(i, at, at + a.wait_s) for i, at, a in answers if not a.granted]
    return refused, sum(a.granted for _, _, a in answers)


async def test_jobs_giving_up_are_told_turns_spread_by_their_place() -> None:
    """Jobs queued behind a head that sleeps for its slot give up: each must be told about
    when its own turn would come, in queue order, not one shared instant, so they come back
    spread and the queue never runs dry."""
    spy = Spy(qps=4)
    limiter = HorizonLimiter(spy, horizon_s=0.05)
    refused, _ = await _come_backs(limiter, 30, max_wait_s=1.0)
    assert len(refused) >= 20
    # Come-backs grow with the place in the queue, about 1/rate apart (4/s here): ~26 jobs
    # need ~6.5 s, and that is how far apart the first and the last are told to come back.
    # (The first refusal may be the head's own, told its slot plus a slot of margin: within
    # one slot of the next.)
    first, *back = [at for _, _, at in refused]
    assert back == sorted(back)
    assert abs(first - back[0]) <= 0.3
    gaps = [b - a for a, b in itertools.pairwise(back)]
    assert all(gap == pytest.approx(0.25, rel=0.5) for gap in gaps)
    assert back[-1] - back[0] > 4.0


async def test_a_burst_is_told_early_not_all_at_its_deadline() -> None:
    """A fleet starting on a backlog: every job arrives at once. Those whose place is past
    the wait must hear it as soon as the rate is known, so they come back while the ones
    kept are still being served; had they all given up at the deadline, the queue would
    stand empty until the first came back through the database."""
    spy = Spy(qps=10)
    limiter = HorizonLimiter(spy, horizon_s=0.05)
    refused, granted = await _come_backs(limiter, 60, max_wait_s=2.0)
    # The ones kept use every slot up to the deadline (10/s for 2 s, give or take an edge).
    assert granted >= 18
    answered = sorted(at for _, at, _ in refused)
    # Told after the few grants the rate needs (~0.4 s), long before the 2-s deadline.
    assert answered[len(answered) // 2] < 1.0
    # The first told to come back is due before the kept ones run out.
    assert min(back for _, _, back in refused) < 2.0 + 0.3
