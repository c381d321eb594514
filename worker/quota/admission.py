"""A worker process admits to the quota wait only the jobs its share of the quota can serve
soon; the rest of a backlog stays in the broker's queue, unclaimed.

Why: without it every free task thread claims a job (a SQL write), asks the limiter, finds
its turn minutes away and defers the job (another write), then takes the next message: a
backlog of N jobs is claimed and deferred about once each before much of it is served, the
burst starves the CPU when the first calls must leave on time, and CPU per job grows with the
backlog. Admitted here, a job's turn is within the in-process wait, so it is claimed once and
waits asleep; a task thread that finds no room waits before its claim (no SQL, no Redis), and
holds its message, so the broker hands this process no more than its threads can hold.

The room is this process's recent grant rate times `window_s`: the fleet's processes share
the slots, each learns its own share from what it was granted. Until it has a rate (and
whenever its rate is low) a floor of `floor_s` seconds of the whole quota keeps the line fed.
Jobs are admitted in arrival order.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

# How far back grants count toward this process's rate.
RATE_WINDOW_S = 10.0
# The head of the waiters looks at the room this often (grants raise it without a leave).
HEAD_RECHECK_S = 0.5


class Admission:
    """Bounds the jobs of one process that are between their claim and their end."""

    def __init__(
        self,
        *,
        qps: float,
        window_s: float,
        floor_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if qps <= 0 or window_s <= 0:
            raise ValueError("qps and window_s must be > 0")
        self._ceiling = max(1, math.ceil(qps * window_s))
        self._window_s = window_s
        self._floor = min(self._ceiling, max(1, math.ceil(qps * floor_s)))
        self._clock = clock
        self._started = clock()
        self._grants: deque[float] = deque()
        self._inside = 0
        self._lock = threading.Lock()
        # Waiters in arrival order; only the head waits with a timeout (grants raise the
        # room without a wake-up), the others sleep until the one before them is in.
        self._queue: deque[threading.Event] = deque()
        # Set when the worker shuts down: every job goes in at once (and, its turn far off,
        # is deferred in SQL as without admission), so no task thread holds the shutdown up.
        self._open = False

    @property
    def inside(self) -> int:
        """Jobs admitted and not yet left."""
        return self._inside

    @property
    def waiting(self) -> int:
        """Jobs waiting for room."""
        return len(self._queue)

    def rate(self) -> float:
        """This process's grants per second over the last RATE_WINDOW_S (or its life)."""
        with self._lock:
            return self._rate_locked()

    def capacity(self) -> int:
        """How many jobs may be inside now: the recent rate times the window, at least the
        floor, never more than the whole quota's window."""
        with self._lock:
            return self._capacity_locked()

    def enter(self) -> None:
        """Wait (asleep) for room, in arrival order, then count this job inside."""
        with self._lock:
            if self._open or (not self._queue and self._inside < self._capacity_locked()):
                self._inside += 1
                return
            me = threading.Event()
            self._queue.append(me)
        while True:
            with self._lock:
                head = self._queue[0] is me
            me.wait(timeout=HEAD_RECHECK_S if head else None)
            with self._lock:
                if self._open:
                    self._queue.remove(me)
                    self._inside += 1
                    return
                if self._queue[0] is me and self._inside < self._capacity_locked():
                    self._queue.popleft()
                    self._inside += 1
                    self._wake_head_locked()
                    return
                me.clear()

    def open_all(self) -> None:
        """Let every waiting and later job in at once (the worker is shutting down)."""
        with self._lock:
            self._open = True
            for waiter in self._queue:
                waiter.set()

    def leave(self) -> None:
        """The job is over for this run (served, deferred or failed): room for the next."""
        with self._lock:
            self._inside -= 1
            self._wake_head_locked()

    def granted(self) -> None:
        """A call of this process got its slot (the rate the room follows)."""
        with self._lock:
            self._grants.append(self._clock())

    def _wake_head_locked(self) -> None:
        # Woken whether or not there is room: a new head must look, then wait with the
        # timeout rather than forever.
        if self._queue:
            self._queue[0].set()

    def _rate_locked(self) -> float:
        now = self._clock()
        while self._grants and self._grants[0] < now - RATE_WINDOW_S:
            self._grants.popleft()
        span_s = min(RATE_WINDOW_S, max(now - self._started, 1e-3))
        return len(self._grants) / span_s

    def _capacity_locked(self) -> int:
        by_rate = math.ceil(self._rate_locked() * self._window_s)
        return max(self._floor, min(by_rate, self._ceiling))
