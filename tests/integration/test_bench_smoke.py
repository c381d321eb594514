"""Keeps bench/quota.py from rotting: its arithmetic, its plan, and one tiny real scenario."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _harness as h
from bench import drain, quota


def test_window_stats_steady_window_and_whole_run_extremes() -> None:
    # second -> (accepted, throttled); the ramp (100) and the tail (105) are outside [101, 104)
    windows = {100: (2, 0), 101: (5, 0), 102: (5, 1), 103: (4, 0), 104: (6, 2), 105: (1, 0)}
    stats = h.window_stats(windows, 101, 104)
    assert stats.first_s == 100
    assert stats.seconds == 3
    assert stats.accepted == 14
    assert stats.mean_per_s == pytest.approx(14 / 3)
    assert stats.throttled_steady == 1
    # the max window and the throttles count the whole run, not just the steady window
    assert stats.max_window == 6
    assert stats.throttled_total == 3
    assert stats.throttled_fraction == pytest.approx(3 / 26)
    assert stats.per_second == (5, 5, 4)


def test_drain_tail_and_span_utilisation() -> None:
    # 5/s for 18 calls, then a trickle: the run's span and its tail both show it.
    steady = [100 + (i + 0.5) / 5 for i in range(18)]
    trickle = [106.1, 108.3]
    times = steady + trickle
    tail = drain.tail_of(times)
    assert tail == times[-2:]  # 10% of 20 calls
    assert drain.span_utilisation(steady, 5) == pytest.approx(1.0)
    assert drain.span_utilisation(tail, 5) == pytest.approx(1 / (5 * 2.2))
    assert drain.span_utilisation(times, 5) < 0.5
    assert drain.span_utilisation(times, 0) != drain.span_utilisation(times, 0)  # NaN: no Q


def test_drain_plan_and_qps_zero_only_for_drain() -> None:
    args = quota.parse_args(
        ["--mode", "drain", "--qps", "0,5", "--processes", "3", "--backlogs", "10,20"]
    )
    assert [(s.qps, s.jobs) for s in drain.plan(args)] == [(0, 10), (0, 20), (5, 10), (5, 20)]
    with pytest.raises(SystemExit):
        quota.parse_args(["--mode", "quota", "--qps", "0"])


def test_parse_windows_and_first_accepted() -> None:
    doc = {"7": {"accepted": 0, "throttled": 3}, "8": {"accepted": 2, "throttled": 0}}
    windows = h.parse_windows(doc)
    assert windows == {7: (0, 3), 8: (2, 0)}
    assert h.first_accepted_second(windows) == 8
    assert h.first_accepted_second({}) is None


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert h.percentile(values, 50) == 50.0
    assert h.percentile(values, 99) == 99.0
    assert h.percentile([3.0], 99) == 3.0


def test_judge_flags_a_quota_breach() -> None:
    sc = quota.Scenario("quota", "ours", 1, 5, 5, 100, 2)
    windows = h.window_stats({10: (5, 0), 11: (6, 1), 12: (5, 0)}, 10, 12)
    sql = h.SqlStats(11, 11, 1.0, 1.0, 2.0, 0.5, 0.9, 12.0)
    ctx = quota.Context(args=argparse.Namespace(), run_dir=Path("."), emulator=None, images=[])  # type: ignore[arg-type]
    quota.judge(ctx, quota.Figures(sc, windows, sql, 0.0, False))
    assert [line.split()[0] for line in ctx.verdicts] == ["FAIL", "FAIL", "PASS"]


def test_plan_quick_and_full() -> None:
    quick = quota.plan(quota.parse_args(["--quick", "--mode", "quota"]))
    assert [(s.impl, s.emulator_quota, s.processes) for s in quick] == [
        ("ours", 5, 1),
        ("baseline", 5, 1),
    ]
    assert all(s.jobs >= 5 * (s.duration_s + 10) for s in quick)
    full = quota.plan(quota.parse_args([]))
    quota_runs = {(s.emulator_quota, s.processes) for s in full if s.mode == "quota"}
    assert quota_runs == {(q, p) for q in (5, 10, 20) for p in (1, 4)}
    mismatch = [s for s in full if s.mode == "mismatch"]
    assert {(s.limiter_qps, s.emulator_quota) for s in mismatch} == {(10, 7)}
    assert next(s.impl for s in full if s.mode == "noquota") == "baseline"


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_one_tiny_quota_scenario_end_to_end(
    redis_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """Real emulator, Redis, PostgreSQL and `macao-ocr worker`: the figures get measured."""
    args = quota.parse_args(
        [
            "--quick",
            "--mode", "quota",
            "--duration-s", "3",
            "--redis-url", redis_url,
            "--pg-admin-url", pg_admin_url,
            "--pg-prefix", os.environ.get("MACAO_OCR_TEST_PG_PREFIX", "macao_h"),
            "--concurrency", "20",
        ]
    )  # fmt: skip
    images = h.specimen_pool(3)
    assert all(len(image) <= h.MAX_SPECIMEN_BYTES for image in images)
    emulator = h.Emulator.start(tmp_path / "emulator.log", seed=1)
    try:
        ctx = quota.Context(args=args, run_dir=tmp_path, emulator=emulator, images=images)
        sc = quota.Scenario("quota", "ours", 1, 5, 5, 40, 3)
        fig = quota.run_scenario(ctx, sc, 1)
    finally:
        emulator.stop()
    assert fig.windows.seconds == 3
    assert fig.windows.accepted > 0
    assert fig.sql.stored_in_window > 0
    assert fig.sql.calls_per_job >= 1.0
    assert fig.sql.latency_p50_s > 0
    assert "Q=5" in quota.row(fig)
    # The workers were busy in the window: the meter saw their CPU.
    assert fig.cpu is not None and fig.cpu.used_s["workers"] > 0
    assert "workers" in quota.cpu_line(fig)


def test_cpu_meter_counts_a_busy_child_and_what_its_parent_reaped() -> None:
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    meter = h.CpuMeter({"me": lambda: [os.getpid()]})
    meter.start()
    # A child that ends inside the window still counts: its parent (this process) reaps it.
    subprocess.run([sys.executable, "-c", busy], check=True)
    meter.stop()
    assert meter.used_s["me"] >= 0.25
    assert meter.wall_s >= 0.25


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_floor_prints_every_layer(redis_url: str, pg_admin_url: str) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.floor", "--tasks", "300", "--calls", "60",
            "--sql-jobs", "30", "--processes", "1", "--concurrency", "20",
            "--redis-url", redis_url, "--pg-admin-url", pg_admin_url,
        ],
        capture_output=True, text=True, timeout=170, cwd=h.REPO_ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for part in ("celery workers", "http client", "emulator", "pipeline sql", "postgres"):
        assert part in out.stdout
    assert "jobs/s on" in out.stdout


def test_noquota_is_judged_only_where_the_fleet_has_a_process_per_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    windows = h.window_stats({10: (225, 0), 11: (225, 0), 12: (225, 0)}, 10, 12)
    sql = h.SqlStats(450, 450, 1.0, 1.0, 2.0, 0.5, 0.9, 12.0)  # 225 jobs/s over 2 s
    base_sc = quota.Scenario("noquota", "baseline", 1, 0, 0, 100, 2)
    base_sql = h.SqlStats(12, 12, 1.0, 1.0, 2.0, 0.5, 0.9, 12.0)  # 6 jobs/s
    baseline = quota.Figures(base_sc, windows, base_sql, 0.0, False)
    ctx = quota.Context(args=argparse.Namespace(), run_dir=Path("."), emulator=None, images=[])  # type: ignore[arg-type]
    for processes in (1, 2):
        sc = quota.Scenario("noquota", "ours", processes, 0, 0, 100, 2)
        quota.judge(ctx, quota.Figures(sc, windows, sql, 0.0, False), baseline)
    # 1 process on 2 cores: printed, not judged; 2 processes: both targets judged.
    assert [line.split()[0] for line in ctx.infos] == ["INFO"]
    assert "P=1" in ctx.infos[0] and "not judged" in ctx.infos[0]
    assert [line.split()[0] for line in ctx.verdicts] == ["PASS", "PASS"]
    assert all("P=2" in line for line in ctx.verdicts)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_memory_benchmark_prints_its_figures(redis_url: str, pg_admin_url: str) -> None:
    """bench.memory at toy sizes: both scenarios run and print RSS and calls in flight."""
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.memory", "--calls", "12", "--large", "2",
            "--large-bytes", "200000", "--cap-mb", "4", "--latency-ms", "1500",
            "--large-latency-ms", "300",
            "--redis-url", redis_url, "--pg-admin-url", pg_admin_url,
            "--pg-prefix", os.environ.get("MACAO_OCR_TEST_PG_PREFIX", "macao_m"), "--json",
            "--timeout-s", "120",
        ],
        capture_output=True, text=True, timeout=230, cwd=h.REPO_ROOT,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-2000:]
    figures = {f["name"]: f for f in json.loads(out.stdout.strip().splitlines()[-1])}
    assert figures["specimens"]["succeeded"] == 12 and figures["large"]["succeeded"] == 2
    # 12 specimen calls fit a 4 MB cap (220 KB each): all of them were in flight at once.
    assert figures["specimens"]["peak_in_flight"] == 12
    assert figures["large"]["peak_rss_mb"] >= figures["large"]["idle_rss_mb"] > 0
    assert "PASS specimens" in out.stdout or "FAIL specimens" in out.stdout
    assert "large: peak RSS" in out.stdout


def test_memory_benchmark_counts_calls_in_flight_from_attempts() -> None:
    from datetime import UTC, datetime, timedelta

    from bench import memory

    t0 = datetime(2030, 1, 1, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    assert memory.peak_overlap([(at(0), at(2)), (at(1), at(3)), (at(2), at(4))]) == 2
    assert memory.peak_overlap([]) == 0
