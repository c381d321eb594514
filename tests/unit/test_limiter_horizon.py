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

    async def reserve(self, key: str, *, max_wait_s: float, newcomer: bool = False) -> Reservation:
        self.asks += 1
        now = time.time()
        answer = await self.inner.reserve(key, max_wait_s=max_wait_s, newcomer=newcomer)
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
) -> tuple[list[tuple[int, float, float]], list[float]]:
    """`jobs` newcomers at once: (place, answered at, told to come back at) of each refusal,
    in arrival order, and when each granted one's slot is. Times from the burst's start."""
    t0 = time.monotonic()

    async def one(place: int) -> tuple[int, float, Reservation]:
        answer = await limiter.reserve(KEY, max_wait_s=max_wait_s, newcomer=True)
        return place, time.monotonic() - t0, answer

    answers = await asyncio.gather(*(one(i) for i in range(jobs)))
    refused = [(i, at, at + a.wait_s) for i, at, a in answers if not a.granted]
    slots = sorted(a.wait_s for _, _, a in answers if a.granted)
    return refused, slots


async def test_newcomers_past_their_wait_are_told_their_turns_at_once() -> None:
    """A fleet starting on a backlog: every job arrives at once. Those whose turn is past
    their wait hear it at once (no waiting for a deadline), each its own turn in arrival
    order, one slot apart, starting right after the ones kept: they come back in line and
    the quota never runs dry."""
    spy = Spy(qps=4)
    limiter = HorizonLimiter(spy, horizon_s=0.05)
    refused, slots = await _come_backs(limiter, 30, max_wait_s=1.0)
    assert 3 <= len(slots) <= 5  # 4/s within a second, give or take a window edge
    assert len(refused) == 30 - len(slots)
    assert max(at for _, at, _ in refused) < 0.3
    back = [t for _, _, t in refused]
    assert back == sorted(back)
    gaps = [b - a for a, b in itertools.pairwise(back)]
    assert gaps == pytest.approx([0.25] * len(gaps), abs=0.03)
    assert back[0] - slots[-1] == pytest.approx(0.25, abs=0.1)


async def test_processes_sharing_one_limiter_share_one_line() -> None:
    """Two processes (two queues over one shared limiter) are told interleaved turns of
    ONE line: no two jobs of the fleet are told the same turn, whichever process holds
    them. A process's own estimate could not know the other's jobs."""
    shared = Spy(qps=5)
    a = HorizonLimiter(shared, horizon_s=0.05)
    b = HorizonLimiter(shared, horizon_s=0.05)
    (ra, sa), (rb, sb) = await asyncio.gather(
        _come_backs(a, 20, max_wait_s=0.5), _come_backs(b, 20, max_wait_s=0.5)
    )
    back = sorted(t for _, _, t in ra + rb)
    assert len(back) + len(sa) + len(sb) == 40
    gaps = [y - x for x, y in itertools.pairwise(back)]
    assert min(gaps) == pytest.approx(0.2, abs=0.03)
    assert back[-1] - back[0] == pytest.approx(0.2 * (len(back) - 1), abs=0.1)


async def test_a_newcomer_whose_turn_is_near_sleeps_for_it_then_takes_its_slot() -> None:
    """Turns within the wait are waited for in process, asleep: every job gets its slot,
    one slot apart, with about two asks per job (its turn, then its slot), not a poll."""
    spy = Spy(qps=10)
    limiter = HorizonLimiter(spy, horizon_s=0.05)
    refused, slots = await _come_backs(limiter, 12, max_wait_s=3.0)
    assert not refused
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert gaps == pytest.approx([0.1] * len(gaps), abs=0.03)
    assert spy.asks <= 3 * 12


class SlowAnswer:
    """A shared limiter whose answer takes `round_trip_s`; it reads its clock a third of the
    way through, as a remote one does somewhere in between."""

    def __init__(self, clock: list[float], round_trip_s: float) -> None:
        self.clock = clock
        self.round_trip_s = round_trip_s
        self.read_at: list[float] = []

    async def reserve(self, key: str, *, max_wait_s: float, newcomer: bool = False) -> Reservation:
        self.clock[0] += self.round_trip_s / 3
        self.read_at.append(self.clock[0])
        self.clock[0] += 2 * self.round_trip_s / 3
        return Reservation(True, 0.1, slack_s=0.2, window=1, window_cap=50)

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        return 50.0

    async def effective_rate(self, key: str) -> float:
        return 50.0


@pytest.mark.parametrize("newcomer", [True, False])
async def test_a_grant_counts_its_wait_from_the_answer_so_no_call_leaves_before_its_slot(
    newcomer: bool,
) -> None:
    clock = [1000.0]
    inner = SlowAnswer(clock, round_trip_s=0.03)
    limiter = HorizonLimiter(inner, horizon_s=0.5, clock=lambda: clock[0])
    start = clock[0]
    answer = await limiter.reserve(KEY, max_wait_s=5, newcomer=newcomer)
    assert answer.granted
    slot = inner.read_at[0] + 0.1  # where the limiter put the slot, on its clock
    # The caller sends at start + wait_s: never before the slot (at most the round trip
    # after it), and its slack shrinks by that round trip so it still lands in its window.
    assert start + answer.wait_s >= slot
    assert start + answer.wait_s == pytest.approx(slot + 0.02)
    assert answer.slack_s == pytest.approx(0.2 - 0.03)
    assert start + answer.wait_s + answer.slack_s <= slot + 0.2
