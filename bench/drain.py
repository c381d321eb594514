"""`bench.quota --mode drain`: a backlog drained to its last job (issue 13: quota to the last job).

For each quota Q in `--qps` (0: no quota anywhere, the CPU reference), each fleet size in
`--processes` and each backlog in `--backlogs`: a fresh database and Redis db, the fleet
(`macao-ocr worker --processes N`) started on an EMPTY queue, pinged and told to stop consuming
(Celery's cancel_consumer), the whole backlog submitted through the real producer, then the
CPU meter started and consumption resumed (add_consumer): a real backlog, drained to its end.
Nothing is cut off: the run is judged from the first accepted call to the last.

Printed per scenario: utilisation over the run (accepted calls / (Q x whole seconds from the
first accepted call's second to the last's), as the issue measured its 0.89), the tail
utilisation (the last 10% of the calls: (k - 1) / Q over the time from the first of them to
the last, from the attempt rows' send times, so a window's phase does not matter), throttled
calls, calls per job, and the workers' CPU per stored job (their whole process tree, from
before the first job to the drain: start-up excluded, every claim, deferral and re-claim
included). Then CPU per job by backlog size, and quota-bound against no-quota.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa

from bench import _harness as h

if TYPE_CHECKING:
    from celery import Celery

TAIL_FRACTION = 0.10
# Targets (issue 13).
MIN_TAIL_UTILISATION = 0.95
MIN_RUN_UTILISATION = 0.95
MAX_BACKLOG_CPU_RATIO = 1.2
MAX_QUOTA_CPU_RATIO = 2.0
READY_TIMEOUT_S = 120.0
POLL_S = 0.25
# The tail of the drain (and its stragglers) may take this long past Q's own pace.
DRAIN_SLACK_S = 120.0

DB_TRIES = 30
T = TypeVar("T")

# Prints and counts one PASS/FAIL line: (passed, text).
Verdict = Callable[[bool, str], None]


@dataclass(frozen=True)
class DrainScenario:
    qps: int  # the emulator's quota and the workers' MACAO_OCR_QPS (0: none)
    processes: int
    jobs: int

    @property
    def label(self) -> str:
        return (
            f"Q={self.qps} P={self.processes} jobs={self.jobs}"
            if self.qps
            else (f"noquota P={self.processes} jobs={self.jobs}")
        )


@dataclass(frozen=True)
class DrainFigures:
    scenario: DrainScenario
    stored: int
    accepted: int
    throttled: int
    max_window: int
    first_s: int
    last_s: int
    run_util: float  # windowed, whole seconds first..last
    span_util: float  # (n - 1) / Q over the first to the last send
    tail_util: float  # the same over the last TAIL_FRACTION of the calls
    tail_calls: int
    calls_per_job: float
    bought_twice: int
    worker_cpu_ms_per_job: float
    worker_cpu_s: float
    drain_s: float
    tail_windows: list[tuple[int, int, int]]


def _patient(fn: Callable[[], T]) -> T:
    """`fn` again while PostgreSQL refuses new connections: the machine's server is shared
    (other runs may hold every connection slot for a moment)."""
    for _ in range(DB_TRIES - 1):
        try:
            return fn()
        except sa.exc.OperationalError:
            time.sleep(1.0)
    return fn()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(
    args: argparse.Namespace, emulator: h.Emulator, db_url: str, run_dir: Path, tag: str, qps: int
) -> dict[str, str]:
    env = {
        "MACAO_OCR_DATABASE_URL": db_url,
        "MACAO_OCR_BROKER_URL": args.redis_url,
        "MACAO_OCR_QPS": str(qps),
        "MACAO_OCR_LOG_LEVEL": args.loglevel,
        "MACAO_OCR_METRICS_PORT": str(_free_port()),
        "MACAO_OCR_PROMETHEUS_MULTIPROC_DIR": str(run_dir / f"metrics-{tag}"),
        "MACAO_OCR_BROKER_TWEAKS": "true" if args.broker_tweaks else "false",
    }
    env.update(emulator.env())
    return env


def _control(env: dict[str, str]) -> Celery:
    from celery import Celery

    return Celery("bench-drain-control", broker=env["MACAO_OCR_BROKER_URL"], set_as_current=False)


def _stop_consuming(app: Celery, fleet: h.Fleet, processes: int) -> None:
    """Once every worker process answers a ping (start-up over, not counted), have them all
    stop taking jobs, so the whole backlog is queued before the first job is taken."""
    from worker.broker.publish import QUEUE

    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(app.control.ping(timeout=1.0) or []) < processes:
        if not fleet.alive() or time.monotonic() > deadline:
            raise RuntimeError("the fleet did not start (see its log)")
    replies = app.control.cancel_consumer(QUEUE, reply=True, timeout=5.0) or []
    if len(replies) < processes:
        raise RuntimeError(f"only {len(replies)} of {processes} workers stopped consuming")


def _start_consuming(app: Celery, processes: int) -> None:
    from worker.broker.publish import QUEUE

    replies = app.control.add_consumer(QUEUE, reply=True, timeout=5.0) or []
    if len(replies) < processes:
        raise RuntimeError(f"only {len(replies)} of {processes} workers resumed consuming")


def _answered_calls(db_url: str) -> tuple[list[float], int]:
    """When each answered call left (the attempt rows of OK answers), in order, and how
    many jobs were answered more than once (bought twice)."""
    from models import Attempt

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(Attempt.job_id, Attempt.started_at).where(Attempt.outcome_code == "OK")
            ).all()
    finally:
        engine.dispose()
    per_job = Counter(r[0] for r in rows)
    return sorted(r[1].timestamp() for r in rows), sum(n > 1 for n in per_job.values())


def span_utilisation(times: list[float], qps: int) -> float:
    """(n - 1) calls over the time from the first to the last, as a fraction of Q."""
    if qps <= 0 or len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (len(times) - 1) / (qps * (times[-1] - times[0]))


def tail_of(times: list[float], fraction: float = TAIL_FRACTION) -> list[float]:
    """The last `fraction` of the calls (at least two)."""
    k = max(2, math.ceil(fraction * len(times)))
    return times[-k:]


def run_one(
    args: argparse.Namespace,
    emulator: h.Emulator,
    images: list[bytes],
    run_dir: Path,
    sc: DrainScenario,
    index: int,
) -> DrainFigures:
    tag = f"{index:02d}-drain-p{sc.processes}-q{sc.qps}-n{sc.jobs}"
    h.flush_redis(args.redis_url)
    db_url = h.create_database(args.pg_admin_url, args.pg_prefix)
    fleet: h.Fleet | None = None
    try:
        env = _env(args, emulator, db_url, run_dir, tag, sc.qps)
        emulator.configure(
            quota_per_s=sc.qps,
            latency_median_ms=args.drain_latency_ms,
            latency_sigma=0.3,
            latency_tail_prob=0.01,
            latency_tail_mult=5.0,
        )
        emulator.reset()
        log_path = run_dir / f"{tag}.log"
        fleet = h.Fleet.ours(env, log_path, sc.processes, args.concurrency)
        control = _control(env)
        try:
            _stop_consuming(control, fleet, sc.processes)
            h.enqueue(env, images, sc.jobs, baseline=False)
            cpu = h.CpuMeter({"workers": fleet.pids})
            cpu.start()
            started = time.monotonic()
            _start_consuming(control, sc.processes)
        finally:
            control.close()
        pace_s = sc.jobs / sc.qps if sc.qps else sc.jobs / 50
        deadline = started + pace_s + DRAIN_SLACK_S
        stored = 0
        while time.monotonic() < deadline:
            if not fleet.alive():
                raise RuntimeError(f"a worker process exited early; see {log_path}")
            # The shared server full for a moment: look again at the next poll.
            with contextlib.suppress(sa.exc.OperationalError):
                stored = h.count_stored(db_url)
            if stored >= sc.jobs:
                break
            time.sleep(POLL_S)
        drain_s = time.monotonic() - started
        cpu.stop()
        fleet.stop()
        fleet = None
        windows = h.parse_windows(emulator.counters()["windows"])
        busy = sorted(sec for sec, (acc, _) in windows.items() if acc > 0)
        first_s, last_s = (busy[0], busy[-1]) if busy else (0, 0)
        accepted = sum(acc for acc, _ in windows.values())
        throttled = sum(thr for _, thr in windows.values())
        seconds = last_s - first_s + 1 if busy else 0
        run_util = accepted / (sc.qps * seconds) if sc.qps and seconds else float("nan")
        times, bought_twice = _patient(lambda: _answered_calls(db_url))
        tail = tail_of(times)
        sql = _patient(lambda: h.sql_stats(db_url, 0, math.inf))
        worker_cpu = cpu.used_s.get("workers", 0.0)
        tail_start = math.floor(tail[0]) if tail else last_s
        tail_windows = [(sec, *windows.get(sec, (0, 0))) for sec in range(tail_start, last_s + 1)]
        return DrainFigures(
            scenario=sc,
            stored=stored,
            accepted=accepted,
            throttled=throttled,
            max_window=max((acc + thr for acc, thr in windows.values()), default=0),
            first_s=first_s,
            last_s=last_s,
            run_util=run_util,
            span_util=span_utilisation(times, sc.qps),
            tail_util=span_utilisation(tail, sc.qps),
            tail_calls=len(tail),
            calls_per_job=sql.calls_per_job,
            bought_twice=bought_twice,
            worker_cpu_ms_per_job=1000 * worker_cpu / stored if stored else float("nan"),
            worker_cpu_s=worker_cpu,
            drain_s=drain_s,
            tail_windows=tail_windows,
        )
    finally:
        if fleet is not None:
            fleet.stop()
        if not args.keep:
            h.drop_database(args.pg_admin_url, db_url)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def report(fig: DrainFigures) -> list[str]:
    """The scenario's figures, one per line."""
    sc = fig.scenario
    seconds = fig.last_s - fig.first_s + 1
    tail = " ".join(f"{acc}+{thr}t" if thr else str(acc) for _, acc, thr in fig.tail_windows)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"stored {fig.stored}/{sc.jobs} in {fig.drain_s:.1f} s; accepted {fig.accepted} calls "
        f"over {seconds} s; max/1s {fig.max_window}",
        f"utilisation over the run: {_pct(fig.run_util)} (whole seconds), "
        f"{_pct(fig.span_util)} (first to last send)",
        f"tail utilisation (last {TAIL_FRACTION:.0%} of jobs, {fig.tail_calls} calls): "
        f"{_pct(fig.tail_util)}; its windows: {tail}",
        f"throttled calls: {fig.throttled}; calls/job: {fig.calls_per_job:.3f}",
        f"cpu: workers {fig.worker_cpu_ms_per_job:.2f} ms per stored job "
        f"({fig.worker_cpu_s:.2f} s over {fig.drain_s:.1f} s; load average {load})",
    ]


def plan(args: argparse.Namespace) -> list[DrainScenario]:
    return [DrainScenario(q, p, n) for q in args.qps for p in args.processes for n in args.backlogs]


def judge(figs: list[DrainFigures], verdict: Verdict) -> None:
    """PASS/FAIL lines for the issue's targets."""
    for fig in figs:
        sc = fig.scenario
        verdict(fig.stored == sc.jobs, f"{sc.label}: every job stored ({fig.stored})")
        verdict(
            fig.bought_twice == 0,
            f"{sc.label}: jobs answered twice {fig.bought_twice} == 0 (calls/job "
            f"{fig.calls_per_job:.3f}, throttled calls included)",
        )
        if not sc.qps:
            continue
        verdict(fig.throttled == 0, f"{sc.label}: throttled calls {fig.throttled} == 0")
        verdict(fig.max_window <= sc.qps, f"{sc.label}: max calls/1s {fig.max_window} <= {sc.qps}")
        verdict(
            fig.tail_util >= MIN_TAIL_UTILISATION,
            f"{sc.label}: tail utilisation {_pct(fig.tail_util)} >= {MIN_TAIL_UTILISATION:.0%}",
        )
        verdict(
            fig.span_util >= MIN_RUN_UTILISATION,
            f"{sc.label}: utilisation over the run {_pct(fig.span_util)} "
            f">= {MIN_RUN_UTILISATION:.0%}",
        )
    by_fleet: dict[tuple[int, int], list[DrainFigures]] = {}
    for fig in figs:
        by_fleet.setdefault((fig.scenario.qps, fig.scenario.processes), []).append(fig)
    for (qps, processes), group in by_fleet.items():
        group.sort(key=lambda f: f.scenario.jobs)
        cells = ", ".join(f"{f.scenario.jobs} jobs {f.worker_cpu_ms_per_job:.2f}" for f in group)
        print(f"cpu per stored job by backlog (Q={qps} P={processes}): {cells} ms", flush=True)
        if qps and len(group) > 1:
            small, large = group[0], group[-1]
            ratio = large.worker_cpu_ms_per_job / small.worker_cpu_ms_per_job
            verdict(
                ratio <= MAX_BACKLOG_CPU_RATIO,
                f"Q={qps} P={processes}: cpu/job {large.scenario.jobs} vs {small.scenario.jobs} "
                f"jobs {ratio:.2f}x <= {MAX_BACKLOG_CPU_RATIO}x",
            )
        reference = by_fleet.get((0, processes))
        if qps and reference:
            for fig in group:
                same = [r for r in reference if r.scenario.jobs == fig.scenario.jobs]
                if not same:
                    continue
                ratio = fig.worker_cpu_ms_per_job / same[0].worker_cpu_ms_per_job
                verdict(
                    ratio <= MAX_QUOTA_CPU_RATIO,
                    f"{fig.scenario.label}: cpu/job {ratio:.2f}x the no-quota figure "
                    f"({same[0].worker_cpu_ms_per_job:.2f} ms) <= {MAX_QUOTA_CPU_RATIO}x",
                )


def run(args: argparse.Namespace, images: list[bytes], run_dir: Path, verdict: Verdict) -> None:
    """Every drain scenario, one after the other, on one emulator."""
    scenarios = plan(args)
    emulator = h.Emulator.start(run_dir / "emulator.log", seed=args.seed)
    figs: list[DrainFigures] = []
    try:
        for index, sc in enumerate(scenarios, start=1):
            print(f"\n[{index}/{len(scenarios)}] drain {sc.label}", flush=True)
            fig = run_one(args, emulator, images, run_dir, sc, index)
            figs.append(fig)
            for line in report(fig):
                print(line, flush=True)
    finally:
        emulator.stop()
    print("\n== drain ==")
    judge(figs, verdict)
