"""bench.brokerloss's arithmetic and its plan (the real scenario is the benchmark itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import brokerloss, quota


def test_recovery_is_the_first_sustained_run_at_95_percent() -> None:
    # Q=5: 3/s after the loss, then back at 5 from second 104 (one 4 allowed in 5 windows).
    windows = {sec: (3, 0) for sec in range(100, 104)}
    windows.update({104: (5, 0), 105: (4, 0), 106: (5, 0), 107: (5, 0), 108: (5, 0)})
    assert brokerloss.first_sustained_second(windows, 100, 5, 110) == 104
    # A single full window is not a recovery.
    assert brokerloss.first_sustained_second({100: (5, 0)}, 100, 5, 110) is None


def test_utilisation_counts_missing_windows_as_zero() -> None:
    windows = {10: (20, 0), 11: (10, 1)}
    assert brokerloss.utilisation(windows, 10, 4, 20) == 30 / 80
    assert math.isnan(brokerloss.utilisation(windows, 10, 0, 20))


def test_the_sweep_that_found_the_loss_is_read_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "fleet.log"
    lines = [
        "not json",
        json.dumps(
            {
                "event": "broker_epoch_started",
                "timestamp": "2026-12-03T10:00:00.000000Z",
            }
        ),
        json.dumps(
            {
                "event": "broker_messages_lost",
                "republishing": 42,
                "timestamp": "2026-12-03T10:00:30.500000Z",
            }
        ),
    ]
    log.write_text("\n".join(lines) + "\n")
    start = 1_796_292_000.0  # 2026-12-03T10:00:00Z
    # The first start's epoch line comes before the loss: not the one.
    found = brokerloss.republish_from_log(log, start + 10)
    assert found is not None
    at, jobs = found
    assert at == start + 30.5 and jobs == 42
    assert brokerloss.republish_from_log(log, start + 31) is None


def test_plan_brokerloss_defaults_to_5_and_20_on_1_and_3_processes() -> None:
    scenarios = quota.plan(quota.parse_args(["--mode", "brokerloss"]))
    assert {(s.emulator_quota, s.processes) for s in scenarios} == {
        (q, p) for q in (5, 20) for p in (1, 3)
    }
    for s in scenarios:
        assert s.mode == "brokerloss" and s.limiter_qps == s.emulator_quota
        # Enough backlog for the steady seconds, the loss and the 15 s after it.
        assert s.jobs >= s.emulator_quota * (s.duration_s + 15 + brokerloss.WINDOW_AFTER_S)
