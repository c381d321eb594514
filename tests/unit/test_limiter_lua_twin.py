"""The Lua script and the Python twin are one algorithm: drive both through the same random
sequence of reservations, throttles and reads on the same fake clock and compare every
answer. The script runs in fakeredis (its Lua engine, its TIME patched to the fake clock):
a unit test needing no server. The contract suite runs the script on real Redis."""

from __future__ import annotations

import random
from dataclasses import dataclass

import fakeredis
import fakeredis.commands_mixins.server_mixin as server_mixin
import pytest

from worker.quota import aimd
from worker.quota.limiter_redis import ARGV_CONTROL_FIELDS, lua_source

KEY = "macao-ocr:quota:AKIDTWIN:RecognizeMacaoIDCardOCR:https://ocr.test"


@dataclass
class MicroClock:
    """Whole microseconds, read exactly as the script reads Redis TIME."""

    us: int

    def seconds(self) -> float:
        return self.us // 1_000_000 + (self.us % 1_000_000) / 1_000_000

    def time(self) -> float:  # stands in for the `time` module inside fakeredis
        return self.us / 1_000_000


@pytest.mark.parametrize("seed", range(4))
# 50 and 23.7 close their slots up to keep the edge margin; the others space them evenly.
@pytest.mark.parametrize(
    "qps,burst", [(5.0, 1), (10.0, 1), (7.5, 2), (0.5, 1), (50.0, 1), (23.7, 2)]
)
def test_script_and_twin_agree_step_by_step(
    seed: int, qps: float, burst: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    clock = MicroClock(1_800_000_000_250_000)
    monkeypatch.setattr(server_mixin, "time", clock)
    server = fakeredis.FakeRedis()
    script = server.register_script(lua_source())
    ctl = aimd.RateControl(
        qps=qps,
        burst=burst,
        probe_gap_min_s=0.5,
        probe_settle_s=0.3,
        coalesce_s=0.2,
        increase_fraction_per_s=0.2,
        # Half the runs with a lost-state guard: the first reservation stamps a window.
        lost_state_guard_s=0.5 * (seed % 2),
    )
    control_args = [getattr(ctl, name) for name in ARGV_CONTROL_FIELDS]
    state = aimd.initial_state(ctl)
    granted_windows: list[tuple[int, int]] = []
    for step in range(400):
        clock.us += int(rng.expovariate(1 / 0.08) * 1_000_000)
        now = clock.seconds()
        roll = rng.random()
        where = f"step {step}"
        if roll < 0.8:
            max_wait_s = rng.choice([0.3, 1.0, 5.0, 60.0])
            # Newcomers join the line when refused; holders (and old callers) do not.
            newcomer = rng.random() < 0.4
            state = aimd.stamp(state, ctl, now)
            new, ok, wait_s = aimd.reserve(state, ctl, now, max_wait_s, newcomer)
            granted, lua_wait, lua_slack, lua_win, lua_cap = script(
                keys=[KEY],
                args=[
                    "reserve",
                    *control_args,
                    *(max_wait_s, 0, 0, int(newcomer), ctl.edge_margin_s),
                ],
            )
            assert bool(granted) == ok, where
            assert float(lua_wait) == pytest.approx(wait_s, abs=1e-6), where
            if ok:
                slack_s = new.win + 1 - (now + wait_s)
                assert float(lua_slack) == pytest.approx(slack_s, abs=1e-6), where
                assert (int(lua_win), int(lua_cap)) == (new.win, new.cap), where
                granted_windows.append((new.win, new.cap))
            state = new
        elif roll < 0.92:
            # Mostly with the evidence of a slot handed out earlier, sometimes without.
            window, window_cap = rng.choice(granted_windows[-12:] or [(0, 0)])
            if rng.random() < 0.2:
                window, window_cap = 0, 0
            evidence = (window, window_cap) if window_cap else (None, 0)
            state, rate = aimd.throttled(state, ctl, now, *evidence)
            lua_rate = script(keys=[KEY], args=["throttled", *control_args, 0, window, window_cap])
            assert float(lua_rate) == pytest.approx(rate, abs=1e-9), where
        else:
            lua_rate = script(keys=[KEY], args=["rate"])
            expected = aimd.effective_rate(state, ctl, now)
            if lua_rate is None:
                assert state == aimd.initial_state(ctl), where
            else:
                assert float(lua_rate) == pytest.approx(expected, abs=1e-9), where
