"""Issue 13's memory benchmark: a worker process's RSS with many calls in flight.

    .venv/bin/python -m bench.memory [--calls 500] [--large 50] [--cap-mb 256]
        [--latency-ms 20000] [--large-latency-ms 3000] [--redis-url URL] [--pg-admin-url URL]

Two scenarios, each on a fresh migrated PostgreSQL database and an emptied Redis db, against
the emulator slowed down (`latency_median_ms`) so that calls stay in flight:

1. `--calls` jobs of specimen JPEGs of at most 60 KB, one `macao-ocr worker` process with
   that many threads: every call is in flight at once. Target: peak RSS <= 250 MB.
2. `--large` jobs of maximum-size images (`--large-bytes`, default the largest PNG whose
   base64 fits the API's 7 MB), `MACAO_OCR_MAX_INFLIGHT_BYTES` = `--cap-mb`. Target: peak
   RSS <= 2 x the cap + the idle worker's RSS.

RSS is the worker (Celery child) process's VmRSS from /proc, sampled every 50 ms; "idle" is
read once the worker answers a ping, before any job. Calls in flight are counted from the
attempt rows afterwards (each closed attempt keeps its call's start and end). Prints one line
per figure and a PASS/FAIL line per target; exit status 1 if a target failed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from bench import _harness as h

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_PG_PREFIX = "macao_m"
MB = 1024 * 1024
SPECIMEN_TARGET_MB = 250
# The largest raw image whose base64 fits the API's 7 MB (less a margin for PNG overhead).
MAX_IMAGE_BYTES = 7 * MB // 4 * 3 - 64 * 1024
SAMPLE_S = 0.05
READY_TIMEOUT_S = 90.0


@dataclass
class Figures:
    """One scenario's measurements."""

    name: str
    jobs: int
    succeeded: int
    idle_rss_mb: float
    peak_rss_mb: float
    peak_in_flight: int
    seconds: float


def rss_mb(pids: Sequence[int]) -> float:
    """Summed VmRSS of live processes, in MiB."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


class RssSampler(threading.Thread):
    """Samples the RSS of `pids()` until stopped; keeps the peak."""

    def __init__(self, pids: Sequence[int]) -> None:
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.peak_mb = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb(self.pids))
            self._stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def large_image(n_bytes: int, seed: int) -> bytes:
    """A PNG of about `n_bytes` (random pixels do not compress) that the emulator recognises:
    it carries a specimen's answer key, as specimens do."""
    from emulator.specimen import PNG_TEXT_KEY, make_specimen

    payload = PILImage.open(io.BytesIO(make_specimen(seed, fmt="PNG").image)).info[PNG_TEXT_KEY]
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, payload)
    side = max(8, int(math.sqrt(max(0, n_bytes - len(payload)) / 3)))
    noise = PILImage.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()


def _wait_ready(env: dict[str, str], fleet: h.Fleet) -> list[int]:
    """Block until a worker answers a ping; the worker processes' pids (not the launcher)."""
    from celery import Celery

    app = Celery("bench-memory-ping", broker=env["MACAO_OCR_BROKER_URL"], set_as_current=False)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while not app.control.ping(timeout=1.0):
            if not fleet.alive() or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start (see its log)")
    finally:
        app.close()
    launchers = {p.pid for p in fleet.procs}
    return [pid for pid in fleet.pids() if pid not in launchers]


def _peak_in_flight(url: str) -> int:
    """Most calls open at one instant, from the attempt rows' call start and end."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT started_at, finished_at FROM attempt WHERE finished_at IS NOT NULL")
            ).all()
    finally:
        engine.dispose()
    return peak_overlap([(started, finished) for started, finished in rows])


def peak_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """Most intervals open at one instant (one ending as another starts: not both)."""
    events: list[tuple[datetime, int]] = []
    for started, finished in intervals:
        events += [(started, 1), (finished, -1)]
    peak = current = 0
    for _, step in sorted(events):
        current += step
        peak = max(peak, current)
    return peak


def _succeeded(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM job WHERE status = 'succeeded'")
                ).scalar()
                or 0
            )
    finally:
        engine.dispose()


def run_scenario(
    args: argparse.Namespace,
    emulator: h.Emulator,
    name: str,
    images: Sequence[bytes],
    jobs: int,
    concurrency: int,
    run_dir: Path,
    latency_ms: float,
) -> Figures:
    """One scenario: fresh database and Redis db, a worker, `jobs` jobs, RSS sampled."""
    h.flush_redis(args.redis_url)
    url = h.create_database(args.pg_admin_url, args.pg_prefix)
    fleet: h.Fleet | None = None
    try:
        emulator.configure(latency_median_ms=latency_ms, latency_sigma=0.0, quota_per_s=0)
        emulator.reset()
        env = {
            **emulator.env(),
            "MACAO_OCR_DATABASE_URL": url,
            "MACAO_OCR_BROKER_URL": args.redis_url,
            "MACAO_OCR_QPS": "0",
            "MACAO_OCR_MAX_INFLIGHT_BYTES": str(int(args.cap_mb * MB)),
            "MACAO_OCR_TOTAL_TIMEOUT_S": str(max(30.0, 4 * latency_ms / 1000)),
            "MACAO_OCR_METRICS_PORT": "0",
            "MACAO_OCR_LOG_LEVEL": "WARNING",
        }
        fleet = h.Fleet.ours(env, run_dir / f"{name}-worker.log", 1, concurrency)
        workers = _wait_ready(env, fleet)
        time.sleep(1.0)  # the runtime (HTTP session, pools) is built at ready
        idle = rss_mb(workers)
        sampler = RssSampler(workers)
        sampler.start()
        started = time.monotonic()
        h.enqueue(env, images, jobs, baseline=False)
        deadline = started + args.timeout_s
        done = 0
        while time.monotonic() < deadline:
            done = _succeeded(url)
            if done >= jobs:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
        sampler.stop()
        return Figures(
            name, jobs, done, idle, sampler.peak_mb, _peak_in_flight(url), seconds
        )  # fmt: skip
    finally:
        if fleet is not None:
            fleet.stop()
        h.drop_database(args.pg_admin_url, url)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--calls", type=int, default=500, help="specimen jobs, all in flight")
    parser.add_argument("--large", type=int, default=50, help="maximum-size image jobs")
    parser.add_argument("--large-bytes", type=int, default=MAX_IMAGE_BYTES)
    parser.add_argument("--cap-mb", type=float, default=256.0, help="MACAO_OCR_MAX_INFLIGHT_BYTES")
    parser.add_argument(
        "--latency-ms", type=float, default=20000.0, help="emulator latency, specimens"
    )
    parser.add_argument(
        "--large-latency-ms", type=float, default=3000.0, help="emulator latency, large images"
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per scenario")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="flushed per scenario")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--pg-prefix", default=DEFAULT_PG_PREFIX)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    emulator = h.Emulator.start(run_dir / "emulator.log", seed=1)
    results: list[Figures] = []
    verdicts: list[str] = []
    try:
        if args.calls > 0:
            images = h.specimen_pool(min(args.calls, 50))
            fig = run_scenario(
                args, emulator, "specimens", images, args.calls, args.calls, run_dir,
                args.latency_ms,
            )  # fmt: skip
            results.append(fig)
            ok = fig.peak_rss_mb <= SPECIMEN_TARGET_MB and fig.succeeded == fig.jobs
            verdicts.append(
                f"{'PASS' if ok else 'FAIL'} specimens: peak RSS {fig.peak_rss_mb:.0f} MB "
                f"<= {SPECIMEN_TARGET_MB} MB with {fig.peak_in_flight} calls in flight"
            )
        if args.large > 0:
            images = [large_image(args.large_bytes, seed) for seed in range(min(args.large, 10))]
            fig = run_scenario(
                args, emulator, "large", images, args.large, args.large, run_dir,
                args.large_latency_ms,
            )  # fmt: skip
            results.append(fig)
            limit = 2 * args.cap_mb + fig.idle_rss_mb
            ok = fig.peak_rss_mb <= limit and fig.succeeded == fig.jobs
            verdicts.append(
                f"{'PASS' if ok else 'FAIL'} large: peak RSS {fig.peak_rss_mb:.0f} MB "
                f"<= 2 x {args.cap_mb:.0f} MB cap + {fig.idle_rss_mb:.0f} MB idle = "
                f"{limit:.0f} MB"
            )
    finally:
        emulator.stop()
    sizes = {"specimens": "<= 60 KB", "large": f"{args.large_bytes / MB:.2f} MB"}
    latency = {"specimens": args.latency_ms, "large": args.large_latency_ms}
    for fig in results:
        print(
            f"{fig.name:9}  jobs {fig.jobs} ({sizes[fig.name]} each), stored {fig.succeeded} in "
            f"{fig.seconds:.1f} s, peak in flight {fig.peak_in_flight}, worker RSS idle "
            f"{fig.idle_rss_mb:.0f} MB, peak {fig.peak_rss_mb:.0f} MB "
            f"(cap {args.cap_mb:.0f} MB, latency {latency[fig.name]:.0f} ms)"
        )
    for line in verdicts:
        print(line)
    if args.json:
        print(json.dumps([fig.__dict__ for fig in results]))
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
