"""Intake throughput: jobs/s stored AND published, for 10,000 specimen jobs, per path.

    .venv/bin/python -m bench.intake [--jobs 10000] [--distinct 200] [--chunk-rows 500]

Workers stay stopped: what is measured is the producer alone (validate, store the images and
jobs, commit, publish), into a fresh migrated PostgreSQL database and an emptied Redis db.
Each path's figure is jobs / wall-clock seconds from its start until every job is committed
and its message is in the queue (the queue's length is checked).

Paths:
- `submit_many`: the Python API, in this process.
- `submit --manifest`: the CLI as a user runs it (a subprocess: interpreter start included).
- `POST /v1/batches` and 50 concurrent clients of `POST /v1/jobs`: measured by
  `measure_http_batches` / `measure_http_jobs` when the HTTP service (`macao-ocr api`) exists;
  without it they are reported as not measured.

The manifest names `--distinct` specimen card files (about 60 KB each), cycled: the image
table stores each distinct file once per tenant, as it does for a real manifest that repeats
an image. `--distinct 0` makes every row's file distinct.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from bench import _harness as h

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
HTTP_CLIENTS = 50


@dataclass(frozen=True)
class Figure:
    """Wall-clock jobs/s, and jobs per CPU-second of the producer process (which a loaded,
    shared machine disturbs less; PostgreSQL's and Redis's own CPU is not in it)."""

    path: str
    jobs: int
    seconds: float | None
    note: str = ""
    cpu_s: float | None = None

    def line(self) -> str:
        if self.seconds is None:
            return f"{self.path:<32} not measured: {self.note}"
        rate = self.jobs / self.seconds
        took = f"{self.jobs:>6} jobs in {self.seconds:6.2f} s"
        cpu = f" ({self.jobs / self.cpu_s:5.0f} jobs per producer CPU-s)" if self.cpu_s else ""
        return f"{self.path:<32} {took} = {rate:5.0f} jobs/s{cpu} {self.note}".rstrip()


def write_manifest(folder: Path, jobs: int, distinct: int) -> Path:
    """Specimen card files and a manifest naming them (front, tag)."""
    from emulator.specimen import make_specimen

    files = distinct if distinct > 0 else jobs
    paths = []
    for i in range(files):
        path = folder / f"card-{i:05d}.jpg"
        path.write_bytes(make_specimen(seed=10_000 + i).image)
        paths.append(path.name)
    manifest = folder / "cards.csv"
    with manifest.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["front", "tag"])
        for i in range(jobs):
            writer.writerow([paths[i % files], f"row-{i}"])
    return manifest


def _env(db_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACAO_OCR_")}
    env.update(h.keys_env())
    env.update(
        {
            "MACAO_OCR_DATABASE_URL": db_url,
            "MACAO_OCR_BROKER_URL": redis_url,
            "MACAO_OCR_LOG_LEVEL": "WARNING",
            "MACAO_OCR_TENANT": "bench",
        }
    )
    return env


def _queued(redis_url: str) -> int:
    from worker.broker.queue import broker_message_count

    client = redis.Redis.from_url(redis_url)
    try:
        return broker_message_count(client)
    finally:
        client.close()


def _fresh(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()


def measure_submit_many(manifest: Path, db_url: str, redis_url: str, chunk_rows: int) -> Figure:
    """`worker.producer.submit_many` in this process, from the manifest's rows."""
    from worker.app import create_app
    from worker.broker.publish import CeleryPublisher
    from worker.privacy.seal import Sealer
    from worker.producer import read_manifest, submit_many
    from worker.settings import Settings

    _fresh(redis_url)
    settings = Settings(
        database_url=db_url,
        broker_url=redis_url,
        tenant="bench-python",
        data_keys=h.keys_env()["MACAO_OCR_DATA_KEYS"],
    )
    app = create_app(settings)
    engine = sa.create_engine(settings.database_url)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        specs = read_manifest(manifest)
        ids = submit_many(
            sessionmaker(engine),
            CeleryPublisher(app),
            settings,
            specs,
            chunk_rows=chunk_rows,
            sealer=Sealer.from_settings(settings),
        )
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    finally:
        engine.dispose()
        app.close()
    return _checked("submit_many (Python)", len(ids), seconds, redis_url, cpu_s)


def measure_manifest_cli(manifest: Path, db_url: str, redis_url: str) -> Figure:
    """`macao-ocr submit --manifest` as a subprocess (its start-up included)."""
    _fresh(redis_url)
    cli = Path(sys.executable).parent / "macao-ocr"
    command = [str(cli), "submit", "--manifest", str(manifest)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        command,
        env=_env(db_url, redis_url),
        capture_output=True,
        text=True,
        check=False,
        cwd=h.REPO_ROOT,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"submit --manifest failed: {done.stderr[-2000:]}")
    jobs = len([line for line in done.stdout.splitlines() if line.strip()])
    return _checked("submit --manifest (CLI)", jobs, seconds, redis_url, cpu_s)


def _checked(path: str, jobs: int, seconds: float, redis_url: str, cpu_s: float) -> Figure:
    queued = _queued(redis_url)
    if queued != jobs:
        raise SystemExit(f"{path}: {jobs} jobs submitted but {queued} messages queued")
    return Figure(path, jobs, seconds, cpu_s=cpu_s)


def http_service_available() -> bool:
    """Whether this tree has the HTTP service (`macao-ocr api`)."""
    return importlib.util.find_spec("worker.api") is not None


def measure_http_batches(manifest: Path, db_url: str, redis_url: str) -> Figure:
    """Hook: `POST /v1/batches` of the manifest's jobs (10,000 a request) against
    `macao-ocr api`. Fill in with the HTTP service."""
    return Figure("POST /v1/batches", 0, None, "no HTTP service (worker.api) on this branch")


def measure_http_jobs(manifest: Path, db_url: str, redis_url: str) -> Figure:
    """Hook: single `POST /v1/jobs` from HTTP_CLIENTS concurrent clients against
    `macao-ocr api`. Fill in with the HTTP service."""
    return Figure(
        f"POST /v1/jobs x{HTTP_CLIENTS} clients",
        0,
        None,
        "no HTTP service (worker.api) on this branch",
    )


Measure = Callable[[], Figure]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=200, help="distinct card files (0: all)")
    parser.add_argument("--chunk-rows", type=int, default=500)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument(
        "--pg-prefix", default=os.environ.get("MACAO_OCR_TEST_PG_PREFIX", "bench_intake")
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    db_url = h.create_database(args.pg_admin_url, args.pg_prefix)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
            manifest = write_manifest(Path(tmp), args.jobs, args.distinct)
            print(
                f"{args.jobs} specimen jobs ({args.distinct or args.jobs} distinct files), "
                f"workers stopped, {os.cpu_count()} cores"
            )
            figures = [
                measure_submit_many(manifest, db_url, args.redis_url, args.chunk_rows),
                measure_manifest_cli(manifest, db_url, args.redis_url),
            ]
            if http_service_available():
                print("worker.api found: the HTTP paths' hooks are not filled in yet")
            figures += [
                measure_http_batches(manifest, db_url, args.redis_url),
                measure_http_jobs(manifest, db_url, args.redis_url),
            ]
            for figure in figures:
                print(figure.line())
    finally:
        _fresh(args.redis_url)
        h.drop_database(args.pg_admin_url, db_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
