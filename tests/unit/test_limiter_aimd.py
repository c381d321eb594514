"""The adaptive rate, shown in a deterministic simulation (fake clock, no sleeps).

Configured 10 calls/s against an account whose real quota is 7/s, counted the way Tencent
counts: fixed 1-second windows at arrival, the 8th arrival in a window is throttled.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from worker.quota.limiter_memory import MemoryRateLimiter

KEY = "macao-ocr:quota:AKIDSIM:RecognizeMacaoIDCardOCR:https://ocr.example"
START_S = 1_000_000.0


@dataclass
class FakeClock:
    now: float = START_S

    def __call__(self) -> float:
        return self.now


@dataclass
class SimResult:
    ok: int = 0
    throttled: int = 0
    per_window: Counter[int] = field(default_factory=Counter)
    rates: list[float] = field(default_factory=list)  # effective rate, once a second
    ok_at: list[float] = field(default_factory=list)  # accepted arrivals, s from start

    def ok_per_s(self, start_s: float, end_s: float) -> float:
        return sum(start_s <= t < end_s for t in self.ok_at) / (end_s - start_s)


async def simulate(
    *,
    configured_qps: float,
    real_quota: int | Callable[[float], int],
    duration_s: float,
    workers: int = 12,
    latency_s: float = 0.03,
    jitter_s: float = 0.01,
    service_s: float = 0.4,
    seed: int = 7,
    tuning: dict[str, float] | None = None,
    evidence: bool = True,
) -> SimResult:
    """Discrete-event run: each worker reserves, waits, sends, and reports throttles."""
    rng = random.Random(seed)
    clock = FakeClock()
    limiter = MemoryRateLimiter(configured_qps, 1, clock, tuning=tuning)
    result = SimResult()
    end_s = START_S + duration_s
    # (time, seq, kind, worker); kinds: ready -> arrive -> respond(ok) -> ready
    events: list[tuple[float, int, str, int, bool]] = []
    seq = 0
    # Each worker's last slot: (window, window_cap), handed back with a throttle as the
    # pipeline does (evidence=False: the bare AIMD step, for comparison).
    slot_of: dict[int, tuple[int | None, int]] = {}

    def push(at: float, kind: str, worker: int, ok: bool = True) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, worker, ok))

    for worker in range(workers):
        push(START_S + rng.uniform(0, 0.5), "ready", worker)
    next_sample = START_S
    while events:
        at, _, kind, worker, ok = heapq.heappop(events)
        clock.now = at
        if at >= next_sample:
            result.rates.append(await limiter.effective_rate(KEY))
            next_sample += 1.0
        if kind == "ready":
            if at >= end_s:
                continue
            reservation = await limiter.reserve(KEY, max_wait_s=60.0)
            assert reservation.granted
            slot_of[worker] = (reservation.window, reservation.window_cap)
            send = at + reservation.wait_s
            arrive = send + latency_s + rng.uniform(-jitter_s, jitter_s)
            push(arrive, "arrive", worker)
        elif kind == "arrive":
            window = int(at)
            quota = real_quota(at - START_S) if callable(real_quota) else real_quota
            accepted = result.per_window[window] < quota
            result.per_window[window] += 1
            push(at + service_s * rng.uniform(0.5, 1.5), "respond", worker, accepted)
            # Count what the server saw inside the measured span only.
            if at < end_s:
                result.ok += accepted
                result.throttled += not accepted
                if accepted:
                    result.ok_at.append(at - START_S)
        else:
            if not ok:
                window, window_cap = slot_of[worker] if evidence else (None, 0)  # type: ignore[assignment]
                await limiter.throttled(KEY, window=window, window_cap=window_cap)
            push(at, "ready", worker)
    return result


async def test_converges_near_the_real_quota_with_few_throttles() -> None:
    duration_s = 300.0
    result = await simulate(configured_qps=10, real_quota=7, duration_s=duration_s)
    calls = result.ok + result.throttled
    ok_per_s = result.ok / duration_s
    assert ok_per_s >= 0.9 * 7, f"{ok_per_s:.2f} calls/s"
    assert result.throttled / calls < 0.02, f"{result.throttled} throttled of {calls}"
    # It really adapted: the rate left the configured 10 and settled at 7.
    assert result.rates[0] == 10
    settled = result.rates[60:]
    assert max(settled) <= 7
    assert min(settled) >= 6


@pytest.mark.parametrize("seed", [7, 1, 2, 3])
async def test_a_minute_is_enough_to_converge_within_the_throttle_budget(seed: int) -> None:
    # The benchmark's mismatch target over its 60-second window: the first over-quota
    # window's throttles teach the real quota at once, so convergence costs few throttles.
    result = await simulate(configured_qps=10, real_quota=7, duration_s=60.0, seed=seed)
    calls = result.ok + result.throttled
    assert result.ok / 60.0 >= 0.9 * 7
    assert result.throttled / calls < 0.02, f"{result.throttled} throttled of {calls}"
    bare = await simulate(
        configured_qps=10, real_quota=7, duration_s=60.0, seed=seed, evidence=False
    )
    assert result.throttled < bare.throttled


async def test_without_throttles_the_configured_quota_is_used_fully() -> None:
    duration_s = 120.0
    result = await simulate(configured_qps=7, real_quota=7, duration_s=duration_s)
    assert result.throttled == 0
    inner = [result.per_window[w] for w in range(int(START_S) + 1, int(START_S + duration_s))]
    assert max(inner) <= 7
    assert sum(inner) >= 0.98 * 7 * len(inner)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_convergence_holds_across_jitter_seeds(seed: int) -> None:
    duration_s = 300.0
    result = await simulate(configured_qps=10, real_quota=7, duration_s=duration_s, seed=seed)
    calls = result.ok + result.throttled
    assert result.ok / duration_s >= 0.9 * 7
    assert result.throttled / calls < 0.02


async def test_a_raised_quota_is_found_and_a_lowered_one_followed() -> None:
    def quota(t: float) -> int:
        return 7 if t < 120 else 9 if t < 300 else 6

    result = await simulate(configured_qps=10, real_quota=quota, duration_s=480)
    # Found the raise within about a minute (probes, one slot at a time)...
    assert result.ok_per_s(180, 300) >= 0.95 * 9
    # ...and followed the cut down without a throttle storm.
    assert result.ok_per_s(360, 480) >= 0.95 * 6
    assert max(result.rates[360:]) <= 6
    assert result.throttled / (result.ok + result.throttled) < 0.02
