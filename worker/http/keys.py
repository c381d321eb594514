"""API keys remembered briefly per server process: a busy intake does not look its caller's
key up on every request.

Only keys found valid are kept, for `ttl_s` (`MACAO_OCR_HTTP_KEY_CACHE_S`): a revocation
takes effect in every server process within that many seconds. Unknown keys are always
looked up (nobody fills the memory with guesses). Keys are held by their SHA-256, as the
database holds them."""

from __future__ import annotations

import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from worker.tenants import Caller, authenticate, key_sha256

# Past this many remembered keys the memory is emptied (then refilled by lookups).
MAX_KEYS = 10_000


class KeyCache:
    """Thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], ttl_s: float) -> None:
        self.sessions = sessions
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def remembered(self, api_key: str) -> Caller | None:
        """The key's caller if looked up and valid less than `ttl_s` ago (no query)."""
        if self.ttl_s <= 0:
            return None
        found = self._known.get(key_sha256(api_key))
        if found is None or time.monotonic() >= found[0]:
            return None
        return found[1]

    def lookup(self, api_key: str) -> Caller | None:
        """The key's caller from the database (None: unknown or revoked); remembered."""
        found = authenticate(self.sessions, api_key)
        if found is not None and self.ttl_s > 0:
            with self._lock:
                if len(self._known) >= MAX_KEYS:
                    self._known.clear()
                self._known[key_sha256(api_key)] = (time.monotonic() + self.ttl_s, found)
        return found
