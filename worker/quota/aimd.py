"""The quota schedule and its adaptive rate, as pure functions over a small state.

`worker/quota/ratelimit.lua` runs the same algorithm inside Redis (shared by every process);
`worker.quota.limiter_memory` runs this module in one process. One contract suite holds them to
the same behaviour; the constants below reach the Lua script as ARGV, so they live here.

Schedule. Tencent counts calls in fixed 1-second windows at arrival. Window k gets a whole
number of slots `cap`, at k + (i + 0.5) * g, where g is the slot spacing (`slot_spacing_s`):
1 / cap (the middle of `cap` equal intervals) unless that leaves less than `edge_margin_s`
after the window's last slot, in which case the slots close up just enough to leave it.
At the quota Q that is exactly Q calls per window. The schedule repeats every second, so
any constant delay between our clock and the server's count still puts exactly Q calls in
each of the server's windows; only a delay that *varies* can push a call over an edge, and
only the late way (a call never arrives before it leaves): the last call of a window
arriving after the edge is counted in the next one, which already has its Q. So the end of
the window gets the wider margin: 50 ms of transit jitter at the end (uniform spacing at
Q=50 left 10 ms) while the slots close up only 4% (19.2 ms apart instead of 20). Up to
Q=10 uniform spacing already leaves 50 ms, so nothing changes there. (The throttles seen
at Q=50 with uniform spacing turned out to be calls sent *early*, which the worker now
prevents: worker.quota.horizon; bench/README.md has both measurements.) A fractional
configured rate carries its fraction to later windows.

Adaptive rate. Tencent's quota is a whole number of calls per window, so an adapted rate
is used as floor(rate) slots per window (never rounded up), and a window may exceed the
cap known to pass (`good_cap`) only as a *probe*: one window at good_cap + 1, whose
answers are awaited (PROBE_SETTLE_S) before it becomes the new good cap. A failed probe
costs one throttle and doubles the gap to the next one (PROBE_GAP_MIN_S..PROBE_GAP_MAX_S),
so a configured rate above the real quota settles at the real quota with a throttle about
once a minute. Any other throttle steps the rate down multiplicatively (DECREASE_FACTOR),
at most once per over-quota event: throttles that answer calls scheduled before the
decrease, or arrive within COALESCE_S of it, are the same event. The rate then climbs
back additively (INCREASE_FRACTION_PER_S of qps per second) up to the configured qps.

Evidence. A throttle answer names the window its call was scheduled in and how many slots
that window had (`Reservation.window`, `window_cap`). Tencent accepts the first Q calls of
a window and throttles the rest, so n throttles from a window of cap slots prove the real
quota is at most cap - n: the good cap drops to that bound at once, and every further
throttle from the same window lowers it by one more. A first over-quota window thus
teaches the real quota in one window instead of one decrease step per window.
tests/unit/test_limiter_aimd.py simulates configured 10/s against a real quota of 7/s:
these constants give ~100% of 7/s with well under 2% of calls throttled.

The line. Slots are booked at most a short horizon ahead (worker.quota.horizon), so the
schedule alone cannot tell a job how long it will wait behind the fleet's other waiting jobs.
A *newcomer* (a job with no place yet) that finds no slot within its wait is given a *turn*
instead: the end of the fleet's line (`line_end`), which then moves one slot (1 / the
effective rate) later. The job waits for its turn (in process if near, else deferred in SQL
to just before it) and then asks as a holder of a place: holders take the next free slot,
as every caller did before the line existed. A newcomer never takes a slot while the line
reaches past it: the slot is some holder's. Turns are estimates, never slots: the schedule
alone decides when a call leaves, so a wrong estimate costs waiting, never a throttle.

A lost state. A state that is not there is either a key never used (the Redis script keeps
an idle one's key for a day and restarts it afresh without what follows) or one that Redis
lost (a restart without persistence, a FLUSHDB) while calls it had scheduled are still on
their way: up to `lost_state_guard_s` (the booking horizon, `quota_horizon_s`) ahead. A
fresh schedule that handed out those windows again would overfill them, and the throttles
would teach it a quota lower than the real one (measured: a fleet at 5/s dropped to 3/s for
25 s, then 4/s for 30 s). So a fresh state's first window is the first one that starts
after `lost_state_guard_s` from now (`stamp`): at most 1 + lost_state_guard_s of quota
unused once, after a loss or the first call on a key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

DECREASE_FACTOR = 0.9  # one window one call over quota needs a small step, not a halving
INCREASE_FRACTION_PER_S = 0.01  # of qps per second: 10 s to regain 10% after a step
COALESCE_S = 1.0  # Tencent's window: throttles within it are one event
PROBE_SETTLE_S = 2.0  # after a probe window ends, its answers are in by then
PROBE_GAP_MIN_S = 4.0
PROBE_GAP_MAX_S = 60.0  # a raised quota is found within about a minute
# A line ending this close to the next slot ends at it (float spacing vs slot positions).
LINE_TOLERANCE_S = 0.001
# How far ahead a lost state may have booked slots. Off unless set: the worker's limiter
# (`RedisRateLimiter.from_settings`) sets it to the booking horizon, Settings.quota_horizon_s.
LOST_STATE_GUARD_S = 0.0
# Least time from a window's last slot to its end (see the module docstring: Schedule).
EDGE_MARGIN_S = 0.05
# `win` of a state no reservation has stamped yet (see `stamp`).
UNSTAMPED_WIN = -(2**62)


@dataclass(frozen=True)
class RateControl:
    """Configuration of one limiter; `qps` is the configured quota (> 0)."""

    qps: float
    burst: int = 1
    min_rate_fraction: float = 0.2
    decrease_factor: float = DECREASE_FACTOR
    increase_fraction_per_s: float = INCREASE_FRACTION_PER_S
    coalesce_s: float = COALESCE_S
    probe_settle_s: float = PROBE_SETTLE_S
    probe_gap_min_s: float = PROBE_GAP_MIN_S
    probe_gap_max_s: float = PROBE_GAP_MAX_S
    lost_state_guard_s: float = LOST_STATE_GUARD_S
    edge_margin_s: float = EDGE_MARGIN_S

    def __post_init__(self) -> None:
        if not self.qps > 0:
            raise ValueError("qps must be > 0 (0 means unlimited and needs no schedule)")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        if not 0 < self.min_rate_fraction <= 1:
            raise ValueError("min_rate_fraction must be in (0, 1]")
        if not 0 < self.decrease_factor < 1:
            raise ValueError("decrease_factor must be in (0, 1)")
        if not self.increase_fraction_per_s > 0:
            raise ValueError("increase_fraction_per_s must be > 0")
        if self.lost_state_guard_s < 0:
            raise ValueError("lost_state_guard_s must be >= 0")
        # Below half a second the slots keep more than half their spacing before the first
        # of them, so the worker's early lead (a quarter slot) stays inside the window.
        if not 0 <= self.edge_margin_s < 0.5:
            raise ValueError("edge_margin_s must be in [0, 0.5)")

    @property
    def rate_min(self) -> float:
        return self.min_rate_fraction * self.qps

    @property
    def increase_per_s(self) -> float:
        return self.increase_fraction_per_s * self.qps


def control_for(
    qps: float,
    burst: int,
    min_rate_fraction: float,
    tuning: Mapping[str, Any] | None = None,
) -> RateControl | None:
    """A backend's configuration; None when qps is 0 (unlimited: no schedule at all)."""
    if qps < 0:
        raise ValueError("qps must be >= 0")
    if qps == 0:
        return None
    control = RateControl(qps=qps, burst=burst, min_rate_fraction=min_rate_fraction)
    return replace(control, **dict(tuning or {}))


@dataclass(frozen=True)
class QuotaState:
    """What the limiter remembers for one key (times in seconds on the shared clock)."""

    rate: float  # the rate at `rate_ts`
    rate_ts: float  # additive recovery counts from here
    hold_until: float  # throttles before this belong to the last decrease
    win: int  # the open window (a whole second): the latest one holding a reservation
    cap: int  # slots in the open window
    used: int  # slot indices taken (or let pass) in the open window
    carry: float  # fraction of a slot owed to later windows, in [0, 1)
    last_slot: float  # send time of the latest reservation
    good_cap: int  # slots per window known to pass
    probe_cap: int  # good_cap + 1 while a probe is under way, else 0
    probe_win: int  # the probe window (the latest one)
    probe_sent: int  # slots handed out in the probe window
    probe_next: float  # no new probe window before this
    probe_gap_s: float
    tally_win: int  # the latest window throttles were answered for
    tally_n: int  # throttles answered for tally_win
    line_end: float = -math.inf  # the turn the next newcomer gets (if the schedule is not later)


def initial_state(ctl: RateControl) -> QuotaState:
    """A key never seen: start at the configured rate, trusting it until throttled."""
    return QuotaState(
        rate=ctl.qps,
        rate_ts=-math.inf,
        hold_until=-math.inf,
        win=UNSTAMPED_WIN,
        cap=0,
        used=0,
        carry=0.0,
        last_slot=-math.inf,
        good_cap=math.ceil(ctl.qps),
        probe_cap=0,
        probe_win=-(2**62),
        probe_sent=0,
        probe_next=-math.inf,
        probe_gap_s=ctl.probe_gap_min_s,
        tally_win=-(2**62),
        tally_n=0,
    )


def stamp(state: QuotaState, ctl: RateControl, now: float) -> QuotaState:
    """A fresh state's first reservation: an empty window up to `lost_state_guard_s` from now,
    so that no slot goes into a window a lost state may have filled (see the module doc).
    Kept even when that reservation is refused (else every retry would push it further).
    Any other state (or a guard of 0) is returned as it is."""
    if state.win != UNSTAMPED_WIN or ctl.lost_state_guard_s <= 0:
        # Nothing booked ahead: the slots of this window already passed are skipped anyway.
        return state
    return replace(state, win=math.floor(now + ctl.lost_state_guard_s), cap=0, used=0)


def current_rate(state: QuotaState, ctl: RateControl, now: float) -> float:
    """The rate after additive recovery, capped by the quota and by the next probe."""
    rate = state.rate
    if now > state.rate_ts:
        rate += ctl.increase_per_s * (now - state.rate_ts)
    return min(ctl.qps, float(state.good_cap + 1), rate)


def effective_rate(state: QuotaState, ctl: RateControl, now: float) -> float:
    """Calls per second the schedule hands out now (what operators and metrics see)."""
    good_cap = state.good_cap
    if _probe_passed(state, ctl, now):
        good_cap = state.probe_cap  # adopted when the next window opens
    return min(current_rate(state, ctl, now), float(good_cap))


def _answers_in(state: QuotaState, ctl: RateControl) -> float:
    """When the answers to the (latest) probe window's calls are in."""
    return state.probe_win + 1 + ctl.probe_settle_s


def _probe_passed(state: QuotaState, ctl: RateControl, now: float) -> bool:
    return (
        state.probe_cap > 0
        and state.probe_sent >= state.probe_cap
        and now >= _answers_in(state, ctl)
    )


def _open(state: QuotaState, ctl: RateControl, rate: float, now: float, win: int) -> QuotaState:
    """Open window `win`: size it from the rate, then apply the probe rule."""
    if 1 <= rate < ctl.qps:
        # An adapted rate estimates a whole-number quota: never round it up.
        cap, carry = math.floor(rate), state.carry
    else:
        total = rate + state.carry
        cap = math.floor(total)
        carry = total - cap
    if state.probe_cap:
        if _probe_passed(state, ctl, now):
            # Its window was full, its answers are in, and none was throttled.
            state = replace(
                state,
                good_cap=state.probe_cap,
                probe_cap=0,
                probe_next=min(state.probe_next, state.probe_win + ctl.probe_gap_min_s),
                probe_gap_s=ctl.probe_gap_min_s,
            )
        elif win > state.probe_win and state.probe_sent < state.probe_cap:
            state = replace(state, probe_cap=0)  # the window was not filled: it proved nothing
    if cap > state.good_cap:
        fresh = win >= now  # a probe needs a whole window, none of it passed already
        if (
            not state.probe_cap
            and fresh
            and win >= state.probe_next
            and now >= _answers_in(state, ctl)
        ):
            cap = state.good_cap + 1
            state = replace(
                state,
                probe_cap=cap,
                probe_win=win,
                probe_sent=0,
                probe_next=win + state.probe_gap_s,
            )
        else:
            cap = state.good_cap
        carry = 0.0
    return replace(state, win=win, cap=cap, used=0, carry=carry)


def slot_spacing_s(cap: int, edge_margin_s: float) -> float:
    """Time between two slots of a window of `cap` slots (the first sits half of it after
    the window's start): 1 / cap, closed up to leave `edge_margin_s` after the last one."""
    return min(1.0 / cap, (1.0 - edge_margin_s) / (cap - 0.5))


def reserve(
    state: QuotaState, ctl: RateControl, now: float, max_wait_s: float, newcomer: bool = False
) -> tuple[QuotaState, bool, float]:
    """(new state, granted, wait_s). Granted: the next slot, `wait_s` away. Refused: the slot
    is beyond `max_wait_s` (a holder: nothing changes, `wait_s` to that slot), or a newcomer
    joined the line (only `line_end` changes; `wait_s` to its turn)."""
    before = state  # a refusal writes nothing of the windows it looked ahead into
    rate = current_rate(state, ctl, now)
    k = math.floor(now)
    if state.win < k:
        state = _open(state, ctl, rate, now, k)
    while True:
        index = state.used
        if state.win == k and state.cap > 0:
            # Let slots this window already passed go; with burst > 1 take up to burst-1
            # of them now, unless past the last slot (too close to the window's end).
            spacing_s = slot_spacing_s(state.cap, ctl.edge_margin_s)
            tolerance = ctl.burst - 1 if now - k <= (state.cap - 0.5) * spacing_s else 0
            index = max(index, math.ceil((now - k) / spacing_s - 0.5 - tolerance))
        if index < state.cap:
            break
        state = _open(state, ctl, rate, now, state.win + 1)
    spacing_s = slot_spacing_s(state.cap, ctl.edge_margin_s)
    send = max(state.win + (index + 0.5) * spacing_s, now)
    wait_s = send - now
    if newcomer and (wait_s > max_wait_s or state.line_end > send + LINE_TOLERANCE_S):
        # No slot for it now: its turn is the line's end (or the slot, if the line is shorter).
        turn = max(state.line_end, send)
        step_s = 1.0 / max(min(rate, float(state.good_cap)), ctl.rate_min)
        return replace(before, line_end=turn + step_s), False, turn - now
    if wait_s > max_wait_s:
        return before, False, wait_s
    probe_sent = state.probe_sent + (state.probe_cap > 0 and state.win == state.probe_win)
    new = replace(
        state,
        rate=rate,
        rate_ts=now,
        used=index + 1,
        last_slot=max(state.last_slot, send),
        probe_sent=probe_sent,
    )
    return new, True, wait_s


def throttled(
    state: QuotaState,
    ctl: RateControl,
    now: float,
    window: int | None = None,
    window_cap: int = 0,
) -> tuple[QuotaState, float]:
    """Record a throttle answer: fail the probe, or step the rate down once per event; then
    bound the good cap by the evidence of the call's window (`window`, `window_cap`)."""
    state = _step_down(state, ctl, now)
    if window is None or window_cap <= 0 or window < state.tally_win:
        return state, effective_rate(state, ctl, now)
    tally_n = state.tally_n + 1 if window == state.tally_win else 1
    good_cap = max(1, min(state.good_cap, window_cap - tally_n))
    new = replace(
        state,
        tally_win=window,
        tally_n=tally_n,
        good_cap=good_cap,
        cap=max(state.used, min(state.cap, good_cap)),
    )
    if current_rate(new, ctl, now) > good_cap:
        # Recovery climbs from the proven bound; no probe before it has climbed again.
        new = replace(new, rate=float(good_cap), rate_ts=max(new.rate_ts, now))
    return new, effective_rate(new, ctl, now)


def _step_down(state: QuotaState, ctl: RateControl, now: float) -> QuotaState:
    """One step down per over-quota event (or the probe's failure); same event: no change."""
    rate = current_rate(state, ctl, now)
    hold_until = max(now, state.last_slot) + ctl.coalesce_s
    if state.probe_cap:
        # Blame the probe (one window one call over): back to the good cap, probe later.
        gap_s = min(ctl.probe_gap_max_s, 2 * state.probe_gap_s)
        return replace(
            state,
            rate=float(state.good_cap),
            rate_ts=now,
            hold_until=max(state.hold_until, hold_until),
            cap=max(state.used, min(state.cap, state.good_cap)),
            probe_cap=0,
            probe_next=now + gap_s,
            probe_gap_s=gap_s,
        )
    if now < state.hold_until:
        return state
    new_rate = max(ctl.rate_min, min(rate, float(state.good_cap)) * ctl.decrease_factor)
    good_cap = max(1, min(state.good_cap, math.floor(new_rate)))
    return replace(
        state,
        rate=new_rate,
        # Recovery starts once the calls scheduled at the old rate have had their answers.
        rate_ts=hold_until,
        hold_until=hold_until,
        # The open window was sized at the old rate: shrink what is left of it.
        cap=max(state.used, min(state.cap, good_cap)),
        good_cap=good_cap,
    )
