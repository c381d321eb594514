"""The memory bound of a worker process: image bytes in flight, counted and capped.

One `ByteBudget` per process (`MACAO_OCR_MAX_INFLIGHT_BYTES`), shared by its task threads. A
job holds `held_bytes(image bytes)`: the images, the base64 request body built from them and
the base64 text while the body is built (11/3 of the image bytes). Jobs wait for room, first
come first served (a large job is not starved by a stream of small ones), and never fail for
it; a job larger than the whole cap runs when nothing else holds any room, alone.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable

# Images up to this size (each side) come with the job's claim; larger ones are read after
# their room is granted. Their room (both sides, at this size) is reserved before the claim.
INLINE_MAX_BYTES = 512 * 1024


# glibc's mallopt parameter, and the threshold we pin it to (above a specimen's 80 KB body).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_large_buffers_to_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold, so every buffer over it is a mapping of its own, given
    back to the OS when freed. Left dynamic, glibc raises it (up to 32 MB) after the first
    large free, image-sized buffers then come from the heap arenas of the task threads, and
    their memory stays with the process: bench.memory measured 667 MB of RSS for 50 maximum
    -size images under a 256 MB cap, 332 MB with the threshold pinned. False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def held_bytes(image_bytes: int) -> int:
    """Memory a call holds for `image_bytes` of images: the bytes, the base64 request body
    and, while the body is built, the base64 itself (see worker.tencent.client.encode_request)."""
    return image_bytes + 2 * 4 * math.ceil(image_bytes / 3)


# The room a claim reserves is at most this share of the cap: every job in flight shrinks its
# reservation to what it holds, but the next claim must find the whole reservation free.
RESERVE_CAP_FRACTION = 1 / 64


def inline_max_bytes(cap_bytes: int) -> int:
    """The largest side loaded with the claim: both sides' room stays a small share of the
    cap (a large reservation would keep small jobs from filling the room)."""
    side = INLINE_MAX_BYTES
    while side > 0 and held_bytes(2 * side) > cap_bytes * RESERVE_CAP_FRACTION:
        side //= 2
    return side


class ByteBudget:
    """A counter of bytes held, capped, with waiters served in arrival order."""

    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes <= 0:
            raise ValueError("cap_bytes must be positive")
        self.cap_bytes = cap_bytes
        self.inline_max_bytes = inline_max_bytes(cap_bytes)
        self._used = 0
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()

    @property
    def used_bytes(self) -> int:
        """Bytes held now."""
        return self._used

    @property
    def waiting(self) -> int:
        """Threads waiting for room now."""
        return len(self._queue)

    def _fits(self, n: int) -> bool:
        return self._used == 0 or self._used + n <= self.cap_bytes

    def acquire(
        self,
        n: int,
        *,
        on_wait: Callable[[], None] | None = None,
        tick_s: float = 1.0,
    ) -> None:
        """Hold `n` more bytes, waiting (in turn) for room. While it waits, `on_wait` runs
        every `tick_s` (outside the lock; the place in line is kept): a claimed job renews
        its lease there. If `on_wait` raises, nothing is held."""
        if n <= 0:
            return
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while not self._cond.wait_for(
                    lambda: self._queue[0] == ticket and self._fits(n), tick_s
                ):
                    if on_wait is not None:
                        self._cond.release()
                        try:
                            on_wait()
                        finally:
                            self._cond.acquire()
                self._used += n
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now.
                self._cond.notify_all()

    def release(self, n: int) -> None:
        """Give back `n` bytes."""
        if n <= 0:
            return
        with self._cond:
            self._used = max(0, self._used - n)
            self._cond.notify_all()


class Held:
    """What one job holds of a budget (None: no budget, nothing counted)."""

    def __init__(self, budget: ByteBudget | None) -> None:
        self.budget = budget
        self.bytes = 0

    def take(
        self, n: int, *, on_wait: Callable[[], None] | None = None, tick_s: float = 1.0
    ) -> None:
        """Hold `n` more bytes (see ByteBudget.acquire)."""
        if self.budget is None or n <= 0:
            return
        self.budget.acquire(n, on_wait=on_wait, tick_s=tick_s)
        self.bytes += n

    def shrink_to(self, n: int) -> None:
        """Hold only `n` bytes (n <= what is held)."""
        if self.budget is not None and n < self.bytes:
            self.budget.release(self.bytes - n)
            self.bytes = n

    def release(self) -> None:
        """Give everything back."""
        self.shrink_to(0)
