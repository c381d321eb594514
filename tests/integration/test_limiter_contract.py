"""One contract for both limiter backends: the in-memory twin (fake clock) and the Redis
limiter (REAL Redis through `clean_redis`; its clock is Redis TIME, so time passes for real).

Send times are `now + wait_s`, checked against the API's fixed 1-second windows.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from worker.errors import StateUnavailable
from worker.quota.limiter import RateLimiter, limiter_key
from worker.quota.limiter_memory import MemoryRateLimiter
from worker.quota.limiter_redis import RedisRateLimiter
from worker.quota.state import state_redis

KEY = limiter_key("AKIDCONTRACT", "RecognizeMacaoIDCardOCR", "https://ocr.test")
OTHER_KEY = limiter_key("AKIDOTHER", "RecognizeMacaoIDCardOCR", "https://ocr.test")


@dataclass
class Harness:
    """What a test needs from a backend: build a limiter, read and move its clock."""

    name: str
    make: Callable[..., RateLimiter]
    now: Callable[[], float]
    advance: Callable[[float], Any]
    tol_s: float  # how far a computed send time may sit from the ideal (round trip, sleeps)
    closed: list[Any] = field(default_factory=list)
    # Loses `key`'s state as a Redis restart without persistence would (None: memory, where
    # a new limiter on the same clock is a lost state).
    lose: Callable[[str], Any] | None = None


@dataclass
class FakeClock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def free_closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance_fake(dt: float) -> None:
            clock.now += dt

        def make_memory(qps: float, burst: int = 1, **kw: Any) -> RateLimiter:
            return MemoryRateLimiter(qps, burst, clock, **kw)

        yield Harness("memory", make_memory, clock, advance_fake, tol_s=1e-9)
        return
    url = request.getfixturevalue("clean_redis")
    client = state_redis(url)

    def make_redis(qps: float, burst: int = 1, **kw: Any) -> RateLimiter:
        return RedisRateLimiter(client, qps=qps, burst=burst, **kw)

    # Redis TIME and time.time() are the same host clock here.
    yield Harness("redis", make_redis, time.time, asyncio.sleep, tol_s=0.03, lose=client.delete)
    await client.aclose()


async def send_times(limiter: RateLimiter, h: Harness, n: int, key: str = KEY) -> list[float]:
    """Reserve `n` slots back to back; the times they would be sent at."""
    times = []
    for _ in range(n):
        before = h.now()
        reservation = await limiter.reserve(key, max_wait_s=60)
        after = h.now()
        assert reservation.granted
        assert reservation.wait_s >= 0
        # The backend read its clock somewhere in between.
        times.append((before + after) / 2 + reservation.wait_s)
    return times


def per_window(times: list[float]) -> Counter[int]:
    return Counter(math.floor(t) for t in times)


def off_center(t: float, cap: int) -> float:
    """Distance of `t` from the nearest slot centre k + (i + 0.5) / cap."""
    position = (t % 1.0) * cap - 0.5
    return abs(position - round(position)) / cap


async def test_slots_are_spaced_and_centred_in_each_window(harness: Harness) -> None:
    limiter = harness.make(5)
    times = await send_times(limiter, harness, 16)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(gap - 0.2) <= 2 * harness.tol_s for gap in gaps), gaps
    # Every send is ±0.1 s away from both window edges: the middle of its 1/5 s slot.
    assert max(off_center(t, 5) for t in times) <= harness.tol_s
    counts = per_window(times)
    assert max(counts.values()) <= 5
    full = [counts[k] for k in sorted(counts)[1:-1]]
    assert full and all(count == 5 for count in full)


async def test_a_fast_quota_leaves_the_edge_margin_after_each_window_s_last_slot(
    harness: Harness,
) -> None:
    """At 50/s even spacing would put the last slot 10 ms before the window's end; the
    slots close up so that 50 ms are left, still exactly 50 to a window."""
    limiter = harness.make(50)
    times = await send_times(limiter, harness, 160)
    counts = per_window(times)
    full = [counts[k] for k in sorted(counts)[1:-1]]
    assert full and all(count == 50 for count in full), counts
    latest = max(t - math.floor(t) for t in times)
    assert latest <= 1 - 0.05 + harness.tol_s, latest
    if harness.name == "memory":
        # Evenly closed up: 0.95 / 49.5 s apart, the first half of that after the edge.
        spacing_s = 0.95 / 49.5
        positions = [(t - math.floor(t)) / spacing_s - 0.5 for t in times]
        assert max(abs(p - round(p)) for p in positions) < 1e-6
        assert latest == pytest.approx(49.5 * spacing_s)


async def test_no_edge_margin_spreads_the_slots_evenly(harness: Harness) -> None:
    limiter = harness.make(50, tuning={"edge_margin_s": 0.0})
    times = await send_times(limiter, harness, 160)
    # The last slot of a window sits half an even slot (10 ms) before its end.
    assert max(t - math.floor(t) for t in times) >= 0.99 - harness.tol_s
    assert max(per_window(times).values()) <= 50
    if harness.name == "memory":
        assert max(off_center(t, 50) for t in times) <= harness.tol_s


async def test_wait_is_measured_from_now_to_the_slot(harness: Harness) -> None:
    limiter = harness.make(4)
    start = harness.now()
    first = await limiter.reserve(KEY, max_wait_s=60)
    # The first slot is the next slot centre of the current window (or the next one).
    assert first.wait_s <= 0.25 + harness.tol_s
    assert off_center(start + first.wait_s, 4) <= harness.tol_s
    second = await limiter.reserve(KEY, max_wait_s=60)
    assert second.wait_s == pytest.approx(first.wait_s + 0.25, abs=2 * harness.tol_s)
    await harness.advance(0.1)
    third = await limiter.reserve(KEY, max_wait_s=60)
    # Time passed: the wait shrinks accordingly (it is not a fixed delay).
    assert third.wait_s == pytest.approx(first.wait_s + 0.5 - 0.1, abs=3 * harness.tol_s)


async def test_slack_is_the_time_from_the_slot_to_its_window_end(harness: Harness) -> None:
    limiter = harness.make(5)
    for _ in range(12):
        before = harness.now()
        reservation = await limiter.reserve(KEY, max_wait_s=60)
        slot = before + reservation.wait_s
        # Slots sit at k + (i + 0.5)/5: slack is 0.9, 0.7, 0.5, 0.3 or 0.1 s, and a call
        # leaving up to that late still lands in the slot's own window.
        expected = math.floor(slot) + 1 - slot
        assert reservation.slack_s == pytest.approx(expected, abs=2 * harness.tol_s)
        assert 0.1 - 2 * harness.tol_s <= reservation.slack_s <= 0.9 + 2 * harness.tol_s
        assert math.floor(slot + reservation.slack_s - 3 * harness.tol_s) == math.floor(slot)


async def test_a_slot_beyond_max_wait_is_refused_and_nothing_is_reserved(
    harness: Harness,
) -> None:
    limiter = harness.make(5)
    await send_times(limiter, harness, 5)
    before = harness.now()
    refused = await limiter.reserve(KEY, max_wait_s=0.5)
    assert not refused.granted
    assert refused.wait_s > 0.5
    refused_again = await limiter.reserve(KEY, max_wait_s=0.5)
    assert not refused_again.granted
    # The refusals took nothing: the named slot is still the next one handed out.
    granted = await limiter.reserve(KEY, max_wait_s=60)
    assert granted.granted
    assert harness.now() + granted.wait_s == pytest.approx(
        before + refused.wait_s, abs=2 * harness.tol_s
    )


async def align_to(harness: Harness, fraction: float) -> None:
    """Move the clock to `fraction` into the next whole second."""
    now = harness.now()
    target = math.floor(now) + 1 + fraction
    await harness.advance(target - now)


async def test_burst_lets_passed_slots_go_at_once_but_never_overfills_a_window(
    harness: Harness,
) -> None:
    for attempt in range(3):
        strict = harness.make(5, 1)
        bursty = harness.make(5, 3)
        strict_key, bursty_key = f"{KEY}:strict:{attempt}", f"{KEY}:bursty:{attempt}"
        await align_to(harness, 0.6)
        phase = harness.now() % 1.0
        if not 0.59 < phase < 0.68:
            continue  # a loaded machine overslept: slot .7 is too close to judge
        # Slots .1 .3 .5 of this window passed unused. Strict waits for .7; with burst 3,
        # the two passed slots within 2/5 s (.3 and .5) go at once, then .7.
        strict_wait = (await strict.reserve(strict_key, max_wait_s=60)).wait_s
        assert strict_wait == pytest.approx(0.7 - phase, abs=2 * harness.tol_s)
        waits = [(await bursty.reserve(bursty_key, max_wait_s=60)).wait_s for _ in range(3)]
        assert waits[0] <= harness.tol_s and waits[1] <= harness.tol_s
        assert waits[2] == pytest.approx(0.7 - phase, abs=2 * harness.tol_s)
        # Many more: still never more than 5 sends in any window.
        times = await send_times(bursty, harness, 20, bursty_key)
        assert max(per_window(times).values()) <= 5
        return
    pytest.fail("could not place the clock at .6 of a second in 3 tries")


async def test_keys_have_independent_schedules(harness: Harness) -> None:
    limiter = harness.make(2)
    await send_times(limiter, harness, 6)  # KEY is booked ~3 s ahead
    other = await limiter.reserve(OTHER_KEY, max_wait_s=60)
    assert other.granted
    assert other.wait_s <= 0.5 + harness.tol_s
    assert await limiter.effective_rate(OTHER_KEY) == 2


GUARD = {"lost_state_guard_s": 0.5}


async def test_a_fresh_state_starts_after_the_guard(harness: Harness) -> None:
    limiter = harness.make(5, tuning=GUARD)
    before = harness.now()
    [first] = await send_times(limiter, harness, 1)
    # The first window wholly after now + the guard, its first slot (centred).
    assert math.floor(first) == math.floor(before + 0.5) + 1 or (
        harness.name == "redis" and math.floor(first) == math.floor(harness.now() + 0.5) + 1
    )
    assert off_center(first, 5) <= harness.tol_s + 1e-9


async def test_a_lost_state_never_overfills_a_window(harness: Harness) -> None:
    """Slots booked up to the horizon ahead, then the state is lost (a Redis restart): the
    fresh schedule hands out none of those windows again."""
    limiter = harness.make(5, tuning=GUARD)
    steady = await send_times(limiter, harness, 3)
    await harness.advance(steady[-1] - harness.now())  # now inside a steady schedule
    booked = []
    while True:  # everything within the horizon, as worker.quota.horizon books it
        before = harness.now()
        reservation = await limiter.reserve(KEY, max_wait_s=0.5)
        if not reservation.granted:
            break
        booked.append((before + harness.now()) / 2 + reservation.wait_s)
    assert booked
    if harness.lose is None:
        limiter = harness.make(5, tuning=GUARD)
    else:
        await harness.lose(KEY)
    after = await send_times(limiter, harness, 12)
    counts = per_window(booked + after)
    assert max(counts.values()) <= 5, counts
    assert min(after) > max(booked)


async def test_throttle_lowers_the_rate_once_per_event(harness: Harness) -> None:
    limiter = harness.make(10)
    assert await limiter.effective_rate(KEY) == 10
    assert await limiter.throttled(KEY) == pytest.approx(9)
    assert await limiter.effective_rate(KEY) == pytest.approx(9)
    # Answers from the same over-quota moment coalesce into that one step.
    assert await limiter.throttled(KEY) == pytest.approx(9)
    times = await send_times(limiter, harness, 30)
    counts = per_window(times)
    assert max(counts.values()) == 9
    # Calls scheduled before a step are still of that event: no further step.
    assert await limiter.throttled(KEY) == pytest.approx(9)


async def test_throttles_from_one_window_bound_the_cap_to_what_passed(harness: Harness) -> None:
    limiter = harness.make(10)
    await align_to(harness, 0.0)
    first = [await limiter.reserve(KEY, max_wait_s=60) for _ in range(10)]
    assert all(r.granted for r in first)
    window, cap = first[0].window, first[0].window_cap
    assert window is not None and cap == 10
    assert all((r.window, r.window_cap) == (window, cap) for r in first)
    # The API accepted 7 of that window's 10 and throttled 3: the quota is at most 7.
    rates = [await limiter.throttled(KEY, window=window, window_cap=cap) for _ in range(3)]
    assert rates == pytest.approx([9, 8, 7])
    await align_to(harness, 0.0)
    counts = per_window(await send_times(limiter, harness, 21))
    assert max(counts.values()) == 7


async def test_evidence_from_an_older_window_never_raises_the_cap(harness: Harness) -> None:
    limiter = harness.make(10)
    first = await limiter.reserve(KEY, max_wait_s=60)
    assert first.window is not None
    for _ in range(4):
        await limiter.throttled(KEY, window=first.window, window_cap=first.window_cap)
    assert await limiter.effective_rate(KEY) == pytest.approx(6)
    # A throttle answered for an earlier window, or with no evidence, changes no bound.
    older = first.window - 1
    assert await limiter.throttled(KEY, window=older, window_cap=10) == pytest.approx(6)
    assert await limiter.throttled(KEY) == pytest.approx(6)


FAST_RECOVERY = {
    "coalesce_s": 0.05,
    "increase_fraction_per_s": 1.0,  # +10/s at qps 10
    "probe_settle_s": 0.05,
    "probe_gap_min_s": 0.05,
}


async def test_recovery_probes_one_window_above_the_good_cap_then_adopts_it(
    harness: Harness,
) -> None:
    limiter = harness.make(10, tuning=FAST_RECOVERY)
    await limiter.throttled(KEY)
    await harness.advance(0.3)
    # The rate has climbed back, but only a probe may exceed the cap known to pass.
    assert await limiter.effective_rate(KEY) == pytest.approx(9)
    times = await send_times(limiter, harness, 25)
    counts = per_window(times)
    assert max(counts.values()) == 10
    assert sum(1 for count in counts.values() if count == 10) == 1
    # No throttle answered the probe: once its answers are in, 10 per window again.
    await harness.advance(max(times) - harness.now() + 0.1)
    assert await limiter.effective_rate(KEY) == pytest.approx(10)
    await align_to(harness, 0.0)
    counts = per_window(await send_times(limiter, harness, 30))
    assert [counts[k] for k in sorted(counts)] == [10, 10, 10]


async def test_a_throttled_probe_returns_to_the_good_cap(harness: Harness) -> None:
    limiter = harness.make(10, tuning=FAST_RECOVERY)
    await limiter.throttled(KEY)
    await harness.advance(0.3)
    await send_times(limiter, harness, 12)  # includes the probe window
    assert await limiter.throttled(KEY) == pytest.approx(9)
    counts = per_window(await send_times(limiter, harness, 30))
    assert max(counts.values()) == 9


async def test_throttles_in_separate_events_keep_stepping_down_to_the_floor(
    harness: Harness,
) -> None:
    limiter = harness.make(10, min_rate_fraction=0.5, tuning={"coalesce_s": 0.05})
    rates = []
    for _ in range(8):
        rates.append(await limiter.throttled(KEY))
        await harness.advance(0.06)
    # Whole slots per window: 10 x 0.9 = 9, then 9 x 0.9 = 8.1 -> 8, ... floored at 5.
    assert rates == pytest.approx([9, 8, 7, 6, 5, 5, 5, 5], abs=0.05)
    times = await send_times(limiter, harness, 12)
    assert max(per_window(times).values()) <= 5


async def test_zero_qps_means_unlimited(harness: Harness) -> None:
    limiter = harness.make(0)
    reservations = [await limiter.reserve(KEY, max_wait_s=0) for _ in range(50)]
    assert all(r.granted and r.wait_s == 0 for r in reservations)
    assert await limiter.effective_rate(KEY) == math.inf


async def test_unreachable_state_fails_closed(harness: Harness) -> None:
    if harness.name == "memory":
        pytest.skip("the in-memory twin has no shared state to lose")
    client = state_redis(f"redis://127.0.0.1:{free_closed_port()}/0")
    limiter = RedisRateLimiter(client, qps=5)
    try:
        with pytest.raises(StateUnavailable) as caught:
            await limiter.reserve(KEY, max_wait_s=60)
        assert "127.0.0.1" not in str(caught.value)
        with pytest.raises(StateUnavailable):
            await limiter.throttled(KEY)
        with pytest.raises(StateUnavailable):
            await limiter.effective_rate(KEY)
        # Unlimited needs no state, so it never touches Redis.
        unlimited = RedisRateLimiter(client, qps=0)
        assert (await unlimited.reserve(KEY, max_wait_s=0)).granted
    finally:
        await client.aclose()


async def test_a_newcomer_with_no_line_ahead_takes_a_slot_within_its_wait(
    harness: Harness,
) -> None:
    limiter = harness.make(5)
    first = await limiter.reserve(KEY, max_wait_s=60, newcomer=True)
    second = await limiter.reserve(KEY, max_wait_s=60, newcomer=True)
    assert first.granted and second.granted
    assert second.wait_s - first.wait_s == pytest.approx(0.2, abs=2 * harness.tol_s)


async def test_newcomers_beyond_their_wait_are_told_turns_one_slot_apart(
    harness: Harness,
) -> None:
    """The fleet's line: each refused newcomer is handed the line's end as its turn, and
    the line grows by one slot, so newcomers asking together (from any process) are told
    successive turns, not one shared instant."""
    limiter = harness.make(5)
    await send_times(limiter, harness, 5)  # the schedule is booked a second ahead
    asked = harness.now()
    turns = []
    for _ in range(4):
        refused = await limiter.reserve(KEY, max_wait_s=0.1, newcomer=True)
        assert not refused.granted
        turns.append(harness.now() + refused.wait_s)
    # The first turn is the next free slot; every later one a slot (1/5 s) after it.
    gaps = [b - a for a, b in itertools.pairwise(turns)]
    assert gaps == pytest.approx([0.2, 0.2, 0.2], abs=3 * harness.tol_s)
    assert turns[0] - asked == pytest.approx(1.0, abs=0.2)


async def test_a_newcomer_never_takes_a_slot_the_line_owes_a_holder(harness: Harness) -> None:
    limiter = harness.make(5)
    await send_times(limiter, harness, 5)
    told = await limiter.reserve(KEY, max_wait_s=0.1, newcomer=True)
    assert not told.granted
    turn = harness.now() + told.wait_s
    # Another newcomer could wait long enough for that slot, but it is owed: it is told
    # the next turn instead.
    later = await limiter.reserve(KEY, max_wait_s=60, newcomer=True)
    assert not later.granted
    assert harness.now() + later.wait_s == pytest.approx(turn + 0.2, abs=3 * harness.tol_s)
    # The holder of the first turn asks (newcomer=False) and gets the slot at its turn.
    held = await limiter.reserve(KEY, max_wait_s=60)
    assert held.granted
    assert harness.now() + held.wait_s == pytest.approx(turn, abs=3 * harness.tol_s)


async def test_the_line_ends_with_its_last_turn(harness: Harness) -> None:
    """Once the last turn handed out has passed, a newcomer takes a slot again."""
    limiter = harness.make(5)
    await send_times(limiter, harness, 5)
    told = await limiter.reserve(KEY, max_wait_s=0.1, newcomer=True)
    assert not told.granted
    await harness.advance(told.wait_s + 0.5)
    assert (await limiter.reserve(KEY, max_wait_s=0.3, newcomer=True)).granted
