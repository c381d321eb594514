"""The shared-quota limiter interface. Backends: `worker.quota.limiter_redis` (production, shared by
every worker on every host) and `worker.quota.limiter_memory` (unit tests, one process). Both pass
one contract suite (tests/integration/test_limiter_contract.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Reservation:
    """`granted`: a slot is ours; sleep `wait_s` then sign and send at once.
    Not granted: no slot was taken; the earliest slot is `wait_s` away, or for a newcomer
    its turn in the fleet's line is (wait for it, or defer the job to it, then ask again as
    a holder of that place: `newcomer=False`).

    `slack_s`: how much later than its slot a call may still leave and arrive in the slot's
    own 1-second window. A caller that wakes later than that gives the slot up: a call that
    spills into the next (full) window is a throttle.

    `window`, `window_cap`: the slot's 1-second window (on the limiter's clock) and how many
    slots it holds; a throttled call hands them back to `throttled` as evidence. None/0
    when there is no schedule (unlimited) or no slot."""

    granted: bool
    wait_s: float
    slack_s: float = math.inf
    window: int | None = None
    window_cap: int = 0


class RateLimiter(Protocol):
    async def reserve(self, key: str, *, max_wait_s: float, newcomer: bool = False) -> Reservation:
        """Take the next call slot for `key` if it is at most `max_wait_s` away.

        `newcomer`: the caller has no place in the fleet's line yet. It gets a slot only if
        one is within `max_wait_s` and no earlier turn is owed it; otherwise it is refused
        with its turn (`wait_s`), and the line grows by one slot for later newcomers. A holder
        (`newcomer=False`) takes the next free slot; its refusal changes nothing.

        Raises StateUnavailable when the shared state cannot be reached (fail closed)."""
        ...

    async def throttled(self, key: str, *, window: int | None = None, window_cap: int = 0) -> float:
        """The API said RequestLimitExceeded: step the shared rate down; returns the new rate.

        Answers to calls already scheduled before a step count as the same event. `window`
        and `window_cap` are the throttled call's `Reservation` fields: n throttles from one
        window of window_cap slots bound the real quota to window_cap - n."""
        ...

    async def effective_rate(self, key: str) -> float:
        """Calls per second currently allowed for `key` (≤ the configured quota; inf when
        the quota is 0, i.e. unlimited)."""
        ...


def limiter_key(secret_id: str, action: str, endpoint: str) -> str:
    """Tencent counts per SecretId + action + region; the endpoint stands for the region."""
    return f"macao-ocr:quota:{secret_id}:{action}:{endpoint}"
