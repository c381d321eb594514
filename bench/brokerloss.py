"""bench.quota's `brokerloss` scenario: the broker's Redis loses every message mid-run.

    .venv/bin/python -m bench.quota --mode brokerloss [--qps 5,20] [--processes 1,3] -v

A real fleet (`macao-ocr worker --processes N`) works a backlog at quota Q (the emulator
enforces Q; the workers are configured with Q) for `--loss-after-s` seconds of steady
state; then the broker's Redis db is FLUSHDBed, as a Redis restart without persistence
empties it: queued messages, the `unacked` hash, the limiter's and the circuit's state, the
sweeper's lock and epoch key, all at once. The fleet then runs on until every job is
terminal. Printed:

- loss -> republish: seconds from the FLUSHDB to the leader's sweep that found it (its
  `broker_messages_lost` line, republishing what vanished, or `broker_epoch_started` when
  nothing waiting was in the broker), read from the fleet's log;
- republish -> 95%: seconds from the republish to the start of the first RECOVERY_RUN_S
  whole 1-second windows whose accepted calls average >= 95% of Q (target: <= 15 s);
- utilisation over the WINDOW_AFTER_S whole seconds after the republish;
- jobs lost: jobs not succeeded once the backlog is done (target 0);
- double calls: paid (OK) calls beyond one per job, from the attempt rows and from the
  emulator's own count (target 0);
- throttled calls, over the run and after the loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from bench import _harness as h

if TYPE_CHECKING:
    from bench._scenario import Context, Scenario

# The target: back at >= 95% of Q within 15 s of the republish.
RECOVERY_FRACTION = 0.95
RECOVERY_TARGET_S = 15.0
# "Back at 95%" means a sustained rate, not one lucky window: this many whole windows.
RECOVERY_RUN_S = 5
WINDOW_AFTER_S = 15
# Seconds of backlog left after the loss: the republish, the 15 s after it, and slack, so
# the backlog never runs dry inside what is measured.
BACKLOG_AFTER_LOSS_S = 45
REPUBLISH_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 180.0
POLL_S = 0.25
# The leader's sweep that found the loss: it republishes what vanished (the first event),
# or logs that nothing it waits for was in the broker (the second: every job was held by a
# worker or scheduled in SQL).
LOSS_EVENTS = ("broker_messages_lost", "broker_epoch_started")


@dataclass(frozen=True)
class LossFigures:
    """What one brokerloss scenario measured (times are epoch seconds)."""

    scenario: Scenario
    loss_at: float
    republish_at: float | None
    republished: int
    recovered_at: int | None  # start of the first sustained >= 95% run after the republish
    util_after: float  # over WINDOW_AFTER_S whole seconds after the republish
    util_before: float  # over the steady seconds before the loss
    jobs: int
    lost: int
    double_calls_sql: int
    double_calls_emulator: int
    throttled_total: int
    throttled_after_loss: int
    timeline: tuple[tuple[int, int, int], ...]

    @property
    def loss_to_republish_s(self) -> float:
        return math.nan if self.republish_at is None else self.republish_at - self.loss_at

    @property
    def republish_to_95_s(self) -> float:
        if self.republish_at is None or self.recovered_at is None:
            return math.nan
        return max(0.0, self.recovered_at - self.republish_at)


def jobs_for(qps: float, loss_after_s: int) -> int:
    """Backlog for the steady seconds before the loss and BACKLOG_AFTER_LOSS_S after it."""
    return math.ceil(qps * (loss_after_s + 5 + BACKLOG_AFTER_LOSS_S))


def first_sustained_second(
    windows: Mapping[int, tuple[int, int]], from_s: int, quota: float, until_s: int
) -> int | None:
    """The first second s >= from_s whose RECOVERY_RUN_S windows average >= 95% of quota."""
    floor = RECOVERY_FRACTION * quota * RECOVERY_RUN_S
    for sec in range(from_s, until_s - RECOVERY_RUN_S + 1):
        run = sum(windows.get(sec + i, (0, 0))[0] for i in range(RECOVERY_RUN_S))
        if run >= floor - 1e-9:
            return sec
    return None


def utilisation(
    windows: Mapping[int, tuple[int, int]], start_s: int, seconds: int, quota: float
) -> float:
    """Accepted calls in [start_s, start_s + seconds) over what the quota allows."""
    if seconds <= 0 or quota <= 0:
        return math.nan
    accepted = sum(windows.get(start_s + i, (0, 0))[0] for i in range(seconds))
    return accepted / (quota * seconds)


def republish_from_log(log_path: Path, after: float) -> tuple[float, int] | None:
    """(time, jobs republished) of the first LOSS_EVENTS line at or after `after`."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if not line.startswith("{") or not any(event in line for event in LOSS_EVENTS):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") not in LOSS_EVENTS:
            continue
        at = datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()
        if at >= after:
            return at, int(record.get("republishing", 0))
    return None


def _sql_counts(db_url: str) -> tuple[int, int, int]:
    """(jobs, jobs not succeeded, OK attempts beyond one per job)."""
    from models import Attempt, Job, JobStatus

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            jobs = int(conn.execute(sa.select(sa.func.count()).select_from(Job)).scalar_one())
            pending = int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(Job)
                    .where(Job.status != JobStatus.succeeded)
                ).scalar_one()
            )
            per_job = (
                sa.select(sa.func.count().label("n"))
                .where(Attempt.outcome_code == "OK")
                .group_by(Attempt.job_id)
                .subquery()
            )
            extra = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(per_job.c.n - 1), 0)))
            return jobs, pending, int(extra.scalar_one())
    finally:
        engine.dispose()


def _terminal_count(db_url: str) -> int:
    """Jobs done; -1 while PostgreSQL refuses a connection (a shared server's client limit:
    the fleet rides that out, and so does this poll)."""
    from models import Job, JobStatus

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            done = (JobStatus.succeeded, JobStatus.failed)
            query = sa.select(sa.func.count()).select_from(Job).where(Job.status.in_(done))
            return int(conn.execute(query).scalar_one())
    except sa.exc.OperationalError:
        return -1
    finally:
        engine.dispose()


def run(ctx: Context, sc: Scenario, index: int) -> LossFigures:
    """Steady state, FLUSHDB, recovery, drain; then the figures."""
    from bench._scenario import scenario_env as _scenario_env
    from bench._scenario import wait_first_accepted as _wait_first_accepted

    args = ctx.args
    tag = f"{index:02d}-brokerloss-p{sc.processes}-q{sc.emulator_quota}"
    h.flush_redis(args.redis_url)
    db_url = h.create_database(args.pg_admin_url, args.pg_prefix)
    fleet: h.Fleet | None = None
    try:
        env = _scenario_env(ctx, sc, db_url, tag)
        ctx.emulator.configure(quota_per_s=sc.emulator_quota, **sc.latency)
        h.enqueue(env, ctx.images, sc.jobs, baseline=False)
        ctx.emulator.reset()
        log_path = ctx.run_dir / f"{tag}.log"
        fleet = h.Fleet.ours(env, log_path, sc.processes, args.concurrency)
        first = _wait_first_accepted(ctx, fleet, log_path)
        steady_from = first + 1
        loss_at_s = steady_from + sc.duration_s
        time.sleep(max(0.0, loss_at_s + 0.5 - time.time()))
        loss_at = time.time()
        h.flush_redis(args.redis_url)
        found = None
        deadline = time.monotonic() + REPUBLISH_TIMEOUT_S
        while found is None and time.monotonic() < deadline:
            if not fleet.alive():
                raise RuntimeError(f"a worker process exited; see {log_path}")
            time.sleep(POLL_S)
            found = republish_from_log(log_path, loss_at)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while _terminal_count(db_url) < sc.jobs and time.monotonic() < deadline:
            if not fleet.alive():
                raise RuntimeError(f"a worker process exited; see {log_path}")
            time.sleep(1.0)
        fleet.stop()
        fleet = None
        counters = ctx.emulator.counters()
        windows = h.parse_windows(counters["windows"])
        jobs, pending, double_sql = _sql_counts(db_url)
        paid = int(counters.get("ok", 0))
        succeeded = jobs - pending
        last = max((sec for sec, (acc, _) in windows.items() if acc > 0), default=loss_at_s)
        republish_at = found[0] if found else None
        recovered_at = None
        util_after = math.nan
        if republish_at is not None:
            after_s = math.ceil(republish_at)
            recovered_at = first_sustained_second(windows, after_s, sc.emulator_quota, last)
            util_after = utilisation(windows, after_s, WINDOW_AFTER_S, sc.emulator_quota)
        loss_s = math.floor(loss_at)
        return LossFigures(
            scenario=sc,
            loss_at=loss_at,
            republish_at=republish_at,
            republished=found[1] if found else 0,
            recovered_at=recovered_at,
            util_after=util_after,
            util_before=utilisation(windows, steady_from, loss_s - steady_from, sc.emulator_quota),
            jobs=jobs,
            lost=pending,
            double_calls_sql=double_sql,
            double_calls_emulator=max(0, paid - succeeded),
            throttled_total=sum(t for _, t in windows.values()),
            throttled_after_loss=sum(t for sec, (_, t) in windows.items() if sec >= loss_s),
            timeline=tuple((sec, *windows[sec]) for sec in sorted(windows)),
        )
    finally:
        if fleet is not None:
            fleet.stop()
        if not args.keep:
            h.drop_database(args.pg_admin_url, db_url)


def _f(value: float, fmt: str) -> str:
    return "n/a" if math.isnan(value) else format(value, fmt)


def report(fig: LossFigures) -> list[str]:
    """The scenario's figure lines."""
    util_after = "n/a" if math.isnan(fig.util_after) else f"{fig.util_after:.1%}"
    return [
        f"loss -> republish: {_f(fig.loss_to_republish_s, '.1f')} s "
        f"({fig.republished} jobs republished)",
        f"republish -> >= {RECOVERY_FRACTION:.0%} of quota: "
        f"{_f(fig.republish_to_95_s, '.1f')} s (sustained over {RECOVERY_RUN_S} s)",
        f"utilisation in the {WINDOW_AFTER_S} s after the republish: {util_after} "
        f"(before the loss: {fig.util_before:.1%})",
        f"jobs lost: {fig.lost} of {fig.jobs}",
        f"double calls: {fig.double_calls_sql} (attempt rows), "
        f"{fig.double_calls_emulator} (emulator: paid calls beyond one per succeeded job)",
        f"throttled calls: {fig.throttled_total} ({fig.throttled_after_loss} after the loss)",
    ]


def timeline(fig: LossFigures) -> str:
    """1-second windows from 5 s before the loss: accepted[+throttled]; L = the loss's
    second, R = the republish's."""
    loss_s = math.floor(fig.loss_at)
    rep_s = math.floor(fig.republish_at) if fig.republish_at is not None else None
    cells = []
    for sec, acc, thr in fig.timeline:
        if sec < loss_s - 5:
            continue
        cell = f"{acc}+{thr}t" if thr else str(acc)
        marks = ("L" if sec == loss_s else "") + ("R" if sec == rep_s else "")
        cells.append(f"{marks}:{cell}" if marks else cell)
    return "windows from 5 s before the loss (accepted[+throttled]): " + " ".join(cells)


def targets(fig: LossFigures) -> list[tuple[bool, str]]:
    """(ok, text) per target of the issue."""
    sc = fig.scenario
    who = f"brokerloss Q={sc.emulator_quota} P={sc.processes}"
    recovery = fig.republish_to_95_s
    return [
        (fig.republish_at is not None, f"{who}: the lost messages were republished"),
        (
            not math.isnan(recovery) and recovery <= RECOVERY_TARGET_S,
            f"{who}: back at >= {RECOVERY_FRACTION:.0%} of quota "
            f"{_f(recovery, '.1f')} s after the republish <= {RECOVERY_TARGET_S:.0f} s",
        ),
        (fig.lost == 0, f"{who}: jobs lost {fig.lost} == 0"),
        (
            fig.double_calls_sql == 0 and fig.double_calls_emulator == 0,
            f"{who}: double calls {fig.double_calls_sql}/{fig.double_calls_emulator} == 0",
        ),
    ]
