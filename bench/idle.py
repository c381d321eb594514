"""`python -m bench.idle`: what a `macao-ocr worker` fleet burns with nothing to do (issue 13).

A fresh migrated database and Redis db, the emulator, then `macao-ocr worker --processes N`
started on an EMPTY queue; once every worker process answers a ping and `--settle-s` more
seconds have passed (start-up not counted), the CPU of every process of the fleet (the
launcher and its children) is read from /proc over `--idle-s` seconds. Printed: CPU seconds
per minute of each process and of the whole fleet, with the load average.

With `--waiting-jobs J` the queue is not empty: J jobs are submitted at `--qps` before the
window, so the window measures a fleet whose jobs wait on the quota (not idle, but with
little to do), the Q=5 drain's regime.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import _harness as h
from bench import drain

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_PG_PREFIX = "macao_idle"


def _role(pid: int, launchers: set[int]) -> str:
    if pid in launchers:
        return "launcher"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    return cmd[:60]


def run(args: argparse.Namespace) -> list[str]:
    """One idle window; returns the printed lines."""
    run_dir = args.run_dir or Path(f"/tmp/macao-bench-idle-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    h.flush_redis(args.redis_url)
    emulator = h.Emulator.start(run_dir / "emulator.log")
    db_url = h.create_database(args.pg_admin_url, args.pg_prefix)
    fleet: h.Fleet | None = None
    try:
        emulator.configure(quota_per_s=args.qps, latency_median_ms=400.0)
        env = drain._env(args, emulator, db_url, run_dir, "idle", args.qps)
        log_path = run_dir / "idle.log"
        fleet = h.Fleet.ours(env, log_path, args.processes, args.concurrency)
        control = drain._control(env)
        try:
            drain._stop_consuming(control, fleet, args.processes)
            if args.waiting_jobs:
                h.enqueue(env, h.specimen_pool(8), args.waiting_jobs, baseline=False)
            drain._start_consuming(control, args.processes)
        finally:
            control.close()
        time.sleep(args.settle_s)
        launchers = {p.pid for p in fleet.procs}
        pids = fleet.pids()
        before = {pid: h._cpu_s(pid) for pid in pids}
        t0 = time.monotonic()
        time.sleep(args.idle_s)
        if not fleet.alive():
            raise RuntimeError(f"a worker process exited; see {log_path}")
        after = {pid: h._cpu_s(pid) for pid in pids}
        wall_s = time.monotonic() - t0
        stored = h.count_stored(db_url) if args.waiting_jobs else 0
        roles = {pid: _role(pid, launchers) for pid in pids}
    finally:
        if fleet is not None:
            fleet.stop()
        emulator.stop()
        h.drop_database(args.pg_admin_url, db_url)
    per_min = {pid: 60.0 * (after[pid] - before[pid]) / wall_s for pid in pids}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"idle window {wall_s:.1f} s, {args.processes} processes, qps {args.qps}, "
        f"waiting jobs {args.waiting_jobs} (stored by the end: {stored}); load average {load}"
    ]
    for pid in pids:
        lines.append(f"  pid {pid} {roles[pid]:8s} {per_min[pid]:.3f} cpu-s/min")
    lines.append(f"fleet total: {sum(per_min.values()):.3f} cpu-s/min")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--idle-s", type=float, default=60.0, help="measured window")
    parser.add_argument("--settle-s", type=float, default=10.0, help="after start-up, unmeasured")
    parser.add_argument("--qps", type=int, default=5, help="the workers' quota (0: none)")
    parser.add_argument("--waiting-jobs", type=int, default=0, help="jobs queued before")
    parser.add_argument("--loglevel", default="WARNING")
    parser.add_argument(
        "--no-broker-tweaks", dest="broker_tweaks", action="store_false", help="as bench.quota"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--pg-prefix", default=DEFAULT_PG_PREFIX)
    parser.add_argument("--run-dir", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one idle measurement and prints it."""
    for line in run(parse_args(argv)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
