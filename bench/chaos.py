"""Issue 5's chaos run: the longer version of tests/integration/test_chaos.py.

    .venv/bin/python -m bench.chaos [--jobs 3000] [--workers 3] [--concurrency 50] [--qps 50]
        [--kill-every-s 5] [--chaos-for-s 90] [--redis-restarts 2] [--fault-rate 0.02]
        [--pg-restart | --no-pg-restart] [--deadline-s 900] [--keep]

Real PostgreSQL (a fresh migrated database), a PRIVATE redis-server without persistence as
broker and limiter/circuit state (restarting it loses every queued message, as production's
would), the emulator injecting OcrFailed, DownLoadError, InternalError and connection resets
at --fault-rate each, and N `celery worker` processes, one SIGKILLed every --kill-every-s
and started again. Redis is restarted --redis-restarts times. PostgreSQL is restarted once
with `pg_ctlcluster --skip-systemctl-redirect <version> main restart` when this user can
(root or postgres, and pg_ctlcluster present); the run says whether it did. NOTE: that
restarts the machine's cluster for everyone using it: pass --no-pg-restart on a shared box.

Prints the figures and a PASS/FAIL line per check (exit 1 if one fails): every job terminal,
none lost, every job succeeded (all faults are transient), exactly one result and one paid
call per succeeded job, no attempt left open, API calls per succeeded job within
1 + injected fault rate + 1%.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
import sqlalchemy as sa

from bench import _harness as h

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_PG_PREFIX = "macao_chaos"
SPECIMENS = 50
FAULT_KNOBS = ("ocr_failed", "download_error", "internal_error", "reset")
TRANSIENT_CODES = frozenset(
    {"FailedOperation.OcrFailed", "FailedOperation.DownLoadError", "InternalError",
     "Transport.Reset"}
)  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateRedis:
    """redis-server on a free port, nothing on disk."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@dataclass
class Workers:
    """`celery worker` processes, each its own OS process so one can be SIGKILLed."""

    env: dict[str, str]
    log_dir: Path
    concurrency: int
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, index: int) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "threads",
            "-c", str(self.concurrency), "-Q", "macao-ocr", "-n", f"chaos-{index}@%h",
            "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        with (self.log_dir / f"worker-{index}.log").open("ab") as out:
            self.procs[index] = subprocess.Popen(
                command, env=self.env, cwd=h.REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def pg_restart_command() -> list[str] | None:
    """The restart command, or None when this user cannot restart the cluster."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return None
    if os.geteuid() != 0 and os.environ.get("USER") != "postgres":
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]


def status_counts(engine: sa.Engine) -> dict[str, int]:
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select status, count(*) from job group by status"))
            return {str(s): int(n) for s, n in rows}
    except sa.exc.OperationalError:
        return {}  # PostgreSQL restarting


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def figures(engine: sa.Engine, emulator: h.Emulator, jobs: int) -> tuple[list[str], list[Check]]:
    """Read SQL and the emulator's counters; return printable lines and checks."""
    with engine.connect() as conn:
        q = lambda sql: conn.execute(sa.text(sql)).scalar_one()  # noqa: E731
        counts = {str(s): int(n) for s, n in conn.execute(
            sa.text("select status, count(*) from job group by status"))}  # fmt: skip
        total = q("select count(*) from job")
        results = q("select count(*) from result")
        succeeded_without_result = q(
            "select count(*) from job j left join result r on r.job_id = j.id "
            "where j.status = 'succeeded' and r.job_id is null"
        )
        paid_twice = q(
            "select count(*) from (select job_id from attempt where outcome_code = 'OK' "
            "group by job_id having count(*) > 1) t"
        )
        open_attempts = q("select count(*) from attempt where finished_at is null")
        worker_lost = q("select count(*) from attempt where outcome_code = 'WorkerLost'")
        recovered = q("select count(*) from job_event where kind = 'recovered'")
        failed_codes: dict[str, int] = dict(conn.execute(sa.text(
            "select last_error_code, count(*) from job where status = 'failed' "
            "group by last_error_code")).all())  # fmt: skip
    counters = emulator.counters()
    succeeded = counts.get("succeeded", 0)
    terminal = succeeded + counts.get("failed", 0)
    injected = sum(n for code, n in counters["by_code"].items() if code in TRANSIENT_CODES)
    calls_per_job = counters["total"] / succeeded if succeeded else float("inf")
    fault_rate = injected / succeeded if succeeded else float("inf")
    lines = [
        f"jobs {jobs}: {counts}",
        f"results {results}; succeeded without result {succeeded_without_result}; "
        f"paid twice {paid_twice}; open attempts {open_attempts}",
        f"WorkerLost attempts {worker_lost}; recoveries {recovered}; failed by code {failed_codes}",
        f"API calls {counters['total']} (OK {counters['ok']}, injected faults {injected}); "
        f"calls per succeeded job {calls_per_job:.4f}; injected fault rate {fault_rate:.4f}",
        f"emulator outcomes {counters['by_code']}",
    ]
    checks = [
        Check("no job lost", total == jobs, f"{total} of {jobs} in SQL"),
        Check("every job terminal", terminal == jobs, f"{terminal} of {jobs}"),
        Check("every job succeeded (only transient faults)", succeeded == jobs, f"{succeeded}"),
        Check(
            "exactly one result per succeeded job",
            results == succeeded and succeeded_without_result == 0,
            f"{results} results",
        ),
        Check(
            "no result paid twice",
            paid_twice == 0 and counters["ok"] <= succeeded * 1.01,
            f"{paid_twice} jobs with two OK attempts; OK calls {counters['ok']}",
        ),
        Check("no attempt left open", open_attempts == 0, f"{open_attempts}"),
        Check(
            "calls per succeeded job <= 1 + fault rate + 1%",
            calls_per_job <= 1 + fault_rate + 0.01,
            f"{calls_per_job:.4f} <= {1 + fault_rate + 0.01:.4f}",
        ),
    ]
    return lines, checks


def run(args: argparse.Namespace) -> int:
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    pg_cmd = pg_restart_command() if args.pg_restart is not False else None
    if args.pg_restart and pg_cmd is None:
        print("cannot restart PostgreSQL as this user (need root/postgres + pg_ctlcluster)",
              file=sys.stderr)  # fmt: skip
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="macao-chaos-"))
    rng = random.Random(args.seed)
    broker = PrivateRedis()
    broker.start()
    emulator = h.Emulator.start(log_dir / "emulator.log", seed=args.seed)
    database_url = h.create_database(args.pg_admin_url, DEFAULT_PG_PREFIX)
    workers: Workers | None = None
    engine = sa.create_engine(database_url, pool_pre_ping=True)
    try:
        emulator.configure(
            latency_median_ms=args.latency_ms, latency_sigma=0.5,
            **dict.fromkeys(FAULT_KNOBS, args.fault_rate),
        )  # fmt: skip
        env = h.clean_environ()
        env.update(emulator.env())
        env.update(
            {
                "MACAO_OCR_DATABASE_URL": database_url,
                "MACAO_OCR_BROKER_URL": broker.url,
                "MACAO_OCR_QPS": str(args.qps),
                "MACAO_OCR_LEASE_S": str(args.lease_s),
                "MACAO_OCR_SWEEP_INTERVAL_S": "0.5",
                "MACAO_OCR_REPUBLISH_AFTER_S": "10",
                "MACAO_OCR_BACKOFF_BASE_S": "0.2",
                "MACAO_OCR_BACKOFF_MAX_S": "2",
                "MACAO_OCR_MAX_ATTEMPTS": "10",
                "MACAO_OCR_DB_WRITE_RETRY_S": "120",
                "MACAO_OCR_METRICS_PORT": "0",
                "MACAO_OCR_WORKER_CONCURRENCY": str(args.concurrency),
                "MACAO_OCR_LOG_LEVEL": "WARNING",
            }
        )
        print(f"logs in {log_dir}")
        images = h.specimen_pool(SPECIMENS)
        submit_s = h.enqueue(env, images, args.jobs, baseline=False)
        print(f"submitted {args.jobs} jobs in {submit_s:.1f}s")
        workers = Workers(env=env, log_dir=log_dir, concurrency=args.concurrency)
        for index in range(1, args.workers + 1):
            workers.start(index)

        started = time.monotonic()
        next_kill = started + args.kill_every_s
        redis_at = [
            args.chaos_for_s * (i + 1) / (args.redis_restarts + 1)
            for i in range(args.redis_restarts)
        ]
        pg_at = args.chaos_for_s / 2 if pg_cmd else None
        kills = redis_restarts = 0
        pg_note = (
            "PostgreSQL restart: skipped ("
            + ("--no-pg-restart" if args.pg_restart is False else "this user cannot")
            + ")"
        )
        while time.monotonic() - started < args.deadline_s:
            elapsed = time.monotonic() - started
            counts = status_counts(engine)
            if counts.get("succeeded", 0) + counts.get("failed", 0) == args.jobs:
                break
            if elapsed < args.chaos_for_s and time.monotonic() >= next_kill:
                victim = rng.randint(1, args.workers)
                workers.kill(victim)
                workers.start(victim)
                kills += 1
                next_kill += args.kill_every_s
            if redis_at and elapsed >= redis_at[0]:
                redis_at.pop(0)
                broker.restart()
                redis_restarts += 1
                print(f"t={elapsed:.0f}s Redis restarted (queue emptied)")
            if pg_at is not None and pg_cmd and elapsed >= pg_at:
                pg_at = None
                done = subprocess.run(pg_cmd, capture_output=True, text=True, timeout=120)
                pg_note = (
                    f"PostgreSQL restart: done at t={elapsed:.0f}s ({' '.join(pg_cmd)})"
                    if done.returncode == 0
                    else f"PostgreSQL restart: FAILED ({done.stderr.strip()[:200]})"
                )
                print(pg_note)
            time.sleep(0.5)
        duration_s = time.monotonic() - started
        print(
            f"\nchaos over {duration_s:.0f}s: {args.workers} workers, {kills} SIGKILLs, "
            f"{redis_restarts} Redis restarts; {pg_note}"
        )
        lines, checks = figures(engine, emulator, args.jobs)
        for line in lines:
            print(line)
        for check in checks:
            print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        return 0 if all(c.ok for c in checks) else 1
    finally:
        if workers is not None:
            workers.stop()
        engine.dispose()
        emulator.stop()
        broker.stop()
        if not args.keep:
            h.drop_database(args.pg_admin_url, database_url)
            shutil.rmtree(log_dir, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--qps", type=float, default=50.0)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--fault-rate", type=float, default=0.02, help="per fault kind")
    parser.add_argument("--kill-every-s", type=float, default=5.0)
    parser.add_argument("--chaos-for-s", type=float, default=90.0)
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--lease-s", type=float, default=5.0)
    parser.add_argument("--deadline-s", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--pg-restart", action=argparse.BooleanOptionalAction, default=None,
        help="restart PostgreSQL once mid-run (default: when this user can)",
    )  # fmt: skip
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--keep", action="store_true", help="keep the database and logs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
