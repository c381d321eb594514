"""The account circuit interface: account-level errors pause every call on every host."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class Pause:
    code: str
    message: str
    since: datetime


class AccountCircuit(Protocol):
    async def pause(self) -> Pause | None:
        """The current pause, or None when calls may go out."""
        ...

    async def open(self, code: str, message: str) -> bool:
        """Pause all calls. True only for the caller that opened it (it logs loudly, once)."""
        ...

    async def close(self) -> None:
        """Resume calls (a probe succeeded)."""
        ...

    async def claim_probe(self, interval_s: float) -> bool:
        """True for exactly one caller per interval across the fleet: it may send one probe call."""
        ...
