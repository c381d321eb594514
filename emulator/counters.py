"""What the emulator saw: calls by outcome, SecretId, image and 1-second window.

Tests read these through GET /__emulator__/counters to prove, from the server's side,
how many calls were made and whether the quota held.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

OK = "OK"
RESET = "Transport.Reset"
HTTP_502 = "Transport.HTTP502"


@dataclass
class Counters:
    """Mutable tallies; the app is single-threaded (one event loop), so no locking."""

    total: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    by_secret_id: Counter[str] = field(default_factory=Counter)
    by_image_sha256: Counter[str] = field(default_factory=Counter)
    ok_by_image_sha256: Counter[str] = field(default_factory=Counter)
    # epoch second → {"accepted": n, "throttled": n}
    windows: defaultdict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    windows_by_secret_id: defaultdict[str, defaultdict[int, Counter[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Counter))
    )

    def outcome(self, code: str, *, secret_id: str | None, image_sha256: str | None) -> None:
        """Record one finished call."""
        self.total += 1
        self.by_code[code] += 1
        if secret_id is not None:
            self.by_secret_id[secret_id] += 1
        if image_sha256 is not None:
            self.by_image_sha256[image_sha256] += 1
            if code == OK:
                self.ok_by_image_sha256[image_sha256] += 1

    def window(self, second: int, secret_id: str, *, accepted: bool) -> None:
        """Record one call's fate at the quota gate."""
        key = "accepted" if accepted else "throttled"
        self.windows[second][key] += 1
        self.windows_by_secret_id[secret_id][second][key] += 1

    def snapshot(self) -> dict[str, Any]:
        """The JSON document served at /__emulator__/counters (see README)."""

        def windows_json(win: dict[int, Counter[str]]) -> dict[str, dict[str, int]]:
            return {
                str(sec): {"accepted": c["accepted"], "throttled": c["throttled"]}
                for sec, c in sorted(win.items())
            }

        return {
            "total": self.total,
            "ok": self.by_code[OK],
            "by_code": dict(self.by_code),
            "by_secret_id": dict(self.by_secret_id),
            "by_image_sha256": dict(self.by_image_sha256),
            "ok_by_image_sha256": dict(self.ok_by_image_sha256),
            "windows": windows_json(self.windows),
            "windows_by_secret_id": {
                sid: windows_json(win) for sid, win in self.windows_by_secret_id.items()
            },
            "max_accepted_per_window": max(
                (c["accepted"] for c in self.windows.values()), default=0
            ),
            "throttled": sum(c["throttled"] for c in self.windows.values()),
        }
