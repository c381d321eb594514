"""Floors: what each layer a job stands on costs in CPU on this machine, measured alone.

    python -m bench.floor [--tasks 6000] [--calls 3000] [--processes 4] [--concurrency 200]

1. celery: tasks of `bench.floor_app` (our Celery configuration; the task only sleeps 300 ms)
   drained by `celery worker -P threads` processes: CPU of the workers and of Redis per task.
2. http: calls of our OcrClient (signing, aiohttp, response parsing) to the emulator at 300 ms,
   many in flight from one event loop: CPU of this process and of the emulator per call.
3. sql: `python -m bench.pipeline_cpu` (the pipeline's SQL per job with an instant API), and
   PostgreSQL's own CPU meanwhile.

The sum is the least CPU a job can cost with these layers, without the pipeline's own logic,
logging or contention; `cores * 1000 / sum` is the most jobs per second the machine can give.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from bench import _harness as h
from bench._scenario import NOQUOTA_LATENCY
from bench.floor_app import QUEUE, TASK_NAME
from bench.quota import DEFAULT_PG_ADMIN_URL, DEFAULT_REDIS_URL
from worker.broker.queue import queue_keys

WARM_FRACTION = 0.15


def _backlog(client: redis.Redis, queue: str) -> int:
    return sum(int(client.llen(key)) for key in queue_keys(queue))


def celery_floor(args: argparse.Namespace, run_dir: Path) -> tuple[float, dict[str, float]]:
    """Tasks per second and CPU ms per task, by process group."""
    from bench.floor_app import create_app

    h.flush_redis(args.redis_url)
    env = {"MACAO_OCR_BROKER_URL": args.redis_url, "MACAO_OCR_LOG_LEVEL": "WARNING"}
    os.environ.update(env)  # this process publishes with the same app
    app = create_app()
    with app.producer_or_acquire() as producer:
        for _ in range(args.tasks):
            app.send_task(TASK_NAME, args=[str(uuid.uuid4())], queue=QUEUE, producer=producer)
    app.close()
    client = redis.Redis.from_url(args.redis_url)
    commands = [
        [
            sys.executable, "-m", "celery", "-A", "bench.floor_app", "worker", "-P", "threads",
            "-c", str(args.concurrency), "-Q", QUEUE, "-n", f"floor-{i}@%h",
            "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
        ]
        for i in range(1, args.processes + 1)
    ]  # fmt: skip
    fleet = h.Fleet._spawn(commands, env, run_dir / "floor-celery.log")
    try:
        warm_until = args.tasks * (1 - WARM_FRACTION)
        stop_at = args.tasks * WARM_FRACTION
        while _backlog(client, QUEUE) > warm_until:
            if not fleet.alive():
                raise RuntimeError(f"floor worker exited; see {run_dir}")
            time.sleep(0.05)
        meter = h.CpuMeter({"workers": fleet.pids, "redis": lambda: h.pids_named("redis-server")})
        start_backlog = _backlog(client, QUEUE)
        meter.start()
        while (left := _backlog(client, QUEUE)) > stop_at:
            time.sleep(0.05)
        meter.stop()
        done = start_backlog - left
    finally:
        fleet.stop()
        client.close()
    return done / meter.wall_s, {k: 1000 * v / done for k, v in meter.used_s.items()}


async def _calls(
    args: argparse.Namespace, emulator: h.Emulator, images: list[bytes]
) -> tuple[int, float]:
    from worker.logs import configure_logging
    from worker.settings import Settings
    from worker.tencent.client import ClientConfig, OcrClient, make_session
    from worker.tencent.types import ImageInput, OcrRequest

    # The layer alone: the client's own per-call log line is the pipeline's cost, not this.
    settings = Settings(**h._settings_kwargs(emulator.env()), qps=0, log_level="WARNING")
    configure_logging(settings)
    session = make_session(settings)
    client = OcrClient(session, ClientConfig.from_settings(settings))
    gate = asyncio.Semaphore(args.concurrency)
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        async with gate:
            await client.recognize(OcrRequest(front=ImageInput(data=images[i % len(images)])))
            ok += 1

    try:
        await asyncio.gather(*(one(i) for i in range(args.calls // 10)))  # warm
        ok = 0
        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(args.calls)))
        return ok, time.monotonic() - start
    finally:
        await session.close()


def http_floor(args: argparse.Namespace, run_dir: Path) -> tuple[float, dict[str, float]]:
    """Calls per second and CPU ms per call, for this process (the client) and the emulator."""
    images = h.specimen_pool(50)  # drawn before the meter starts: PIL is slow
    emulator = h.Emulator.start(run_dir / "floor-emulator.log", seed=7)
    try:
        emulator.configure(quota_per_s=0, **NOQUOTA_LATENCY)
        pid = emulator.proc.pid
        meter = h.CpuMeter({"client": lambda: [os.getpid()], "emulator": lambda: [pid]})
        meter.start()
        ok, wall_s = asyncio.run(_calls(args, emulator, images))
        meter.stop()
    finally:
        emulator.stop()
    return ok / wall_s, {k: 1000 * v / ok for k, v in meter.used_s.items()}


def sql_floor(args: argparse.Namespace) -> dict[str, float]:
    """The pipeline's SQL per job (bench.pipeline_cpu) and PostgreSQL's CPU meanwhile."""
    meter = h.CpuMeter({"postgres": lambda: h.pids_named("postgres")})
    meter.start()
    out = subprocess.run(
        [sys.executable, "-m", "bench.pipeline_cpu", "--jobs", str(args.sql_jobs),
         "--pg-admin-url", args.pg_admin_url],
        capture_output=True, text=True, check=True, cwd=h.REPO_ROOT,
    ).stdout  # fmt: skip
    meter.stop()
    found = re.search(r"jobs (\d+): ([\d.]+) ms CPU/job", out)
    if found is None:
        raise RuntimeError("bench.pipeline_cpu printed no figure:\n" + out)
    jobs = int(found.group(1)) + 20  # its warm-up jobs ran inside the meter too
    return {"sql": float(found.group(2)), "postgres": 1000 * meter.used_s["postgres"] / jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=6000)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--sql-jobs", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="macao-ocr-floor-"))
    cores = os.cpu_count() or 1
    print(f"macao-ocr floors on {cores} cores (logs in {run_dir})", flush=True)

    rate, celery = celery_floor(args, run_dir)
    print(
        f"celery: {args.processes} x {args.concurrency} threads, {rate:.0f} tasks/s: "
        f"workers {celery['workers']:.2f} ms/task, redis {celery['redis']:.2f} ms/task",
        flush=True,
    )
    rate, http = http_floor(args, run_dir)
    print(
        f"http: {args.concurrency} in flight, {rate:.0f} calls/s: client {http['client']:.2f} "
        f"ms/call, emulator {http['emulator']:.2f} ms/call",
        flush=True,
    )
    sql = sql_floor(args)
    print(
        f"sql: pipeline {sql['sql']:.2f} ms/job (one thread), "
        f"postgres {sql['postgres']:.2f} ms/job",
        flush=True,
    )
    parts = {
        "celery workers": celery["workers"],
        "redis": celery["redis"],
        "http client": http["client"],
        "emulator": http["emulator"],
        "pipeline sql": sql["sql"],
        "postgres": sql["postgres"],
    }
    total = sum(parts.values())
    print("\nfloor per job: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print(
        f"sum {total:.2f} ms CPU/job -> at most {cores * 1000 / total:.0f} jobs/s on {cores} "
        "cores with every core busy and no other cost",
        flush=True,
    )


if __name__ == "__main__":
    main()
