"""Backoff with full jitter, and the bounded in-process retry loop."""

from __future__ import annotations

import itertools
import random

import pytest

from worker.backoff import backoff_cap_s, full_jitter_s, retry_for


def test_cap_doubles_then_stops_at_max() -> None:
    caps = [backoff_cap_s(n, base_s=2.0, max_s=300.0) for n in range(1, 11)]
    assert caps[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert caps[-1] == 300.0
    assert all(a <= b for a, b in itertools.pairwise(caps))


def test_cap_survives_huge_attempt_counts() -> None:
    assert backoff_cap_s(5000, base_s=2.0, max_s=300.0) == 300.0


def test_attempts_below_one_is_a_bug() -> None:
    with pytest.raises(ValueError, match="attempts"):
        backoff_cap_s(0, base_s=1.0, max_s=2.0)


@pytest.mark.parametrize("attempts", [1, 2, 3, 6, 12])
def test_full_jitter_stays_within_zero_and_cap(attempts: int) -> None:
    rng = random.Random(attempts)
    cap = backoff_cap_s(attempts, base_s=2.0, max_s=300.0)
    samples = [full_jitter_s(attempts, base_s=2.0, max_s=300.0, rng=rng) for _ in range(2000)]
    assert all(0.0 <= s <= cap for s in samples)
    # Full jitter uses the whole interval, not a band near the cap (that would be "equal jitter").
    assert min(samples) < 0.05 * cap
    assert max(samples) > 0.95 * cap
    assert 0.4 * cap < sum(samples) / len(samples) < 0.6 * cap


class _Flaky(Exception):
    pass


class _Fatal(Exception):
    pass


def test_retry_for_retries_accepted_errors_until_success() -> None:
    calls: list[int] = []
    sleeps: list[float] = []
    retried: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise _Flaky()
        return "done"

    result = retry_for(
        fn,
        retry_on=lambda e: isinstance(e, _Flaky),
        budget_s=60.0,
        sleep=sleeps.append,
        on_retry=lambda _e, tries, _d: retried.append(tries),
        rng=random.Random(1),
    )
    assert result == "done"
    assert len(calls) == 4
    assert retried == [1, 2, 3]
    assert len(sleeps) == 3 and all(s >= 0.05 for s in sleeps)


def test_retry_for_raises_other_errors_at_once() -> None:
    sleeps: list[float] = []

    def fn() -> None:
        raise _Fatal()

    with pytest.raises(_Fatal):
        retry_for(fn, retry_on=lambda e: isinstance(e, _Flaky), budget_s=60.0, sleep=sleeps.append)
    assert sleeps == []


def test_retry_for_gives_up_when_the_budget_is_spent() -> None:
    now = [0.0]

    def sleep(delay: float) -> None:
        now[0] += delay

    def fn() -> None:
        raise _Flaky()

    with pytest.raises(_Flaky):
        retry_for(
            fn,
            retry_on=lambda e: True,
            budget_s=10.0,
            base_s=1.0,
            max_s=2.0,
            sleep=sleep,
            clock=lambda: now[0],
            rng=random.Random(3),
        )
    # Never sleeps past the budget.
    assert 0.0 < now[0] <= 10.0
