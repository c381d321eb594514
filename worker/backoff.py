"""Retry delays: exponential backoff with full jitter, and a bounded in-process retry loop.

Full jitter (uniform over [0, cap]) spreads a crowd of jobs that failed together across the
whole interval, so a recovering service does not see them come back in one wave.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def backoff_cap_s(attempts: int, *, base_s: float, max_s: float) -> float:
    """The upper bound of the delay after `attempts` budget-spending failures (attempts >= 1)."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    # Clamp the exponent: 2**1100 overflows a float long before max_s is reached.
    exponent = min(attempts - 1, 64)
    return float(min(max_s, base_s * 2.0**exponent))


def full_jitter_s(
    attempts: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """`uniform(0, min(max_s, base_s * 2**(attempts-1)))`: the delay before the next try."""
    cap = backoff_cap_s(attempts, base_s=base_s, max_s=max_s)
    return (rng or random).uniform(0.0, cap)


def retry_for(
    fn: Callable[[], T],
    *,
    retry_on: Callable[[BaseException], bool],
    budget_s: float,
    base_s: float = 0.2,
    max_s: float = 5.0,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Call `fn` until it returns, retrying errors `retry_on` accepts for up to `budget_s`.

    Used for database writes that must not be lost (a bought OCR result while PostgreSQL
    restarts). The last error is raised once the budget is spent; any other error at once.
    `on_retry(exc, try_number, delay_s)` runs before each sleep."""
    deadline = clock() + budget_s
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except Exception as exc:
            if not retry_on(exc):
                raise
            remaining = deadline - clock()
            if remaining <= 0:
                raise
            # Never below a small floor: a tight loop against a dead server helps nobody.
            jitter_s = full_jitter_s(tries, base_s=base_s, max_s=max_s, rng=rng)
            delay = min(remaining, max(0.05, jitter_s))
            if on_retry is not None:
                on_retry(exc, tries, delay)
            sleep(delay)
