"""The in-memory twin of the account circuit: one process, injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from worker.quota.circuit import Pause


class MemoryAccountCircuit:
    """`AccountCircuit` in one process (unit tests); `clock` paces probe claims."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pause: Pause | None = None
        self._probe_until = -float("inf")

    async def pause(self) -> Pause | None:
        """The current pause, or None when calls may go out."""
        return self._pause

    async def open(self, code: str, message: str) -> bool:
        """Pause all calls; True only for the caller that opened it."""
        if self._pause is not None:
            return False
        self._pause = Pause(code=code, message=message, since=datetime.now(UTC))
        return True

    async def close(self) -> None:
        """Resume calls; the next opening starts with a fresh probe interval."""
        self._pause = None
        self._probe_until = -float("inf")

    async def claim_probe(self, interval_s: float) -> bool:
        """True for one caller per `interval_s`."""
        now = self._clock()
        if now < self._probe_until:
            return False
        self._probe_until = now + interval_s
        return True
