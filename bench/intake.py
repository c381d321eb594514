"""Intake throughput: jobs/s stored AND published, for 10,000 specimen jobs, per path.

    .venv/bin/python -m bench.intake [--jobs 10000] [--distinct 200] [--chunk-rows 500]

Workers stay stopped: what is measured is the producer alone (validate, store the images and
jobs, commit, publish), into a fresh migrated PostgreSQL database and an emptied Redis db.
Each path's figure is jobs / wall-clock seconds from its start until every job is committed
and its message is in the queue (the queue's length is checked).

Paths:
- `submit_many`: the Python API, in this process.
- `submit --manifest`: the CLI as a user runs it (a subprocess: interpreter start included).
- `POST /v1/batches` and 50 concurrent clients of single `POST /v1/jobs` (JSON, the card
  inline as base64; aiohttp, keep-alive) against `macao-ocr api --workers 2` started as a
  user runs it (`--api-processes`). Batches go as many jobs a request as the default 64 MiB
  body limit takes, one request in flight per server process. The CPU figure of these two
  is the server's process tree, not the client's.

The manifest names `--distinct` specimen card files (about 60 KB each), cycled: the image
table stores each distinct file once per tenant, as it does for a real manifest that repeats
an image. `--distinct 0` makes every row's file distinct.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
# uvicorn processes: one per core (the machine's 2), the database and Redis sharing them.
HTTP_PROCESSES = 2


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


@dataclass
class ApiProcess:
    """`macao-ocr api --workers N` on a free port, and a tenant key to call it with."""

    url: str
    proc: subprocess.Popen[bytes]
    key: str
    processes: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(db_url: str, redis_url: str, tenant: str, processes: int) -> ApiProcess:
    """Start the HTTP service as a user runs it and wait for /healthz; make a tenant key."""
    cli = Path(sys.executable).parent / "macao-ocr"
    env = _env(db_url, redis_url)
    made = subprocess.run(
        [str(cli), "tenants", "create", tenant, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=h.REPO_ROOT,
    )
    key = json.loads(made.stdout)["api_key"]
    port = _free_port()
    log = (Path(tempfile.gettempdir()) / f"bench-intake-api-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(cli), "api", "--port", str(port), "--workers", str(processes)],
        env=env,
        cwd=h.REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    api = ApiProcess(f"http://127.0.0.1:{port}", proc, key, processes)
    # Generous: a loaded 2-core machine takes a while to import and start two processes.
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit("macao-ocr api exited early")
        try:
            with urllib.request.urlopen(f"{api.url}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return api
        except OSError:
            pass
        if time.monotonic() > deadline:
            api.stop()
            raise SystemExit("macao-ocr api did not answer /healthz")
        time.sleep(0.2)


def _job_bodies(manifest: Path) -> list[bytes]:
    """Each manifest row as a `POST /v1/jobs` JSON body (the card inline as base64)."""
    encoded: dict[str, str] = {}
    bodies = []
    with manifest.open(newline="") as rows:
        for row in csv.DictReader(rows):
            front = row["front"]
            if front not in encoded:
                encoded[front] = base64.b64encode((manifest.parent / front).read_bytes()).decode()
            bodies.append(
                json.dumps({"front": {"base64": encoded[front]}, "tag": row["tag"]}).encode()
            )
    return bodies


def _server_cpu_s(api: ApiProcess) -> float:
    """CPU seconds used so far by the server's process tree (uvicorn's workers included)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [api.proc.pid]
    for pid in list(pids):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        pids.extend(int(c) for c in children)
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


async def _post_all(
    url: str, key: str, bodies: Sequence[bytes], clients: int, extra: dict[str, str]
) -> list[int]:
    """POST every body, `clients` requests in flight over keep-alive connections."""
    import aiohttp

    statuses: list[int] = []
    pending = iter(bodies)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **extra}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for body in pending:
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()
                    statuses.append(answer.status)

        await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


def _run_http(
    name: str,
    api: ApiProcess,
    path: str,
    bodies: Sequence[bytes],
    clients: int,
    jobs: int,
    redis_url: str,
) -> Figure:
    _fresh(redis_url)
    cpu_before = _server_cpu_s(api)
    started = time.perf_counter()
    statuses = asyncio.run(_post_all(api.url + path, api.key, bodies, clients, {}))
    seconds = time.perf_counter() - started
    cpu_s = _server_cpu_s(api) - cpu_before
    refused = [s for s in statuses if s != 201]
    if refused:
        raise SystemExit(f"{name}: {len(refused)} requests refused, e.g. {refused[:5]}")
    figure = _checked(name, jobs, seconds, redis_url, cpu_s)
    note = f"({api.processes} server processes, {clients} clients; CPU-s: the server's)"
    return Figure(figure.path, figure.jobs, figure.seconds, note, figure.cpu_s)


def batch_bodies(manifest: Path, max_body_bytes: int, max_jobs: int) -> list[bytes]:
    """The manifest's jobs as `POST /v1/batches` bodies of up to `max_jobs` jobs, each
    under `max_body_bytes` (the server's MACAO_OCR_HTTP_MAX_BATCH_BODY_BYTES)."""
    bodies: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for job in _job_bodies(manifest):
        if current and (size + len(job) + 64 > max_body_bytes or len(current) == max_jobs):
            bodies.append(b'{"name": null, "jobs": [' + b",".join(current) + b"]}")
            current, size = [], 0
        current.append(job)
        size += len(job) + 1
    if current:
        bodies.append(b'{"name": null, "jobs": [' + b",".join(current) + b"]}")
    return bodies


def measure_http_batches(
    manifest: Path, db_url: str, redis_url: str, processes: int = HTTP_PROCESSES
) -> Figure:
    """`POST /v1/batches` of the manifest's jobs against `macao-ocr api`: as many jobs a
    request as the default batch body limit (64 MiB) takes (at most 10,000), one request in
    flight per server process."""
    from worker.settings import Settings

    limit = Settings.model_construct().http_max_batch_body_bytes
    bodies = batch_bodies(manifest, limit, 10_000)
    jobs = sum(body.count(b'"front"') for body in bodies)
    api = start_api(db_url, redis_url, "bench-http-batches", processes)
    try:
        figure = _run_http(
            "POST /v1/batches", api, "/v1/batches", bodies, processes, jobs, redis_url
        )
    finally:
        api.stop()
    per = -(-jobs // len(bodies))
    return Figure(
        figure.path,
        figure.jobs,
        figure.seconds,
        f"{figure.note[:-1]}; {len(bodies)} requests of <= {per} jobs)",
        figure.cpu_s,
    )


def measure_http_jobs(
    manifest: Path, db_url: str, redis_url: str, processes: int = HTTP_PROCESSES
) -> Figure:
    """Single `POST /v1/jobs` (JSON, the card inline) from HTTP_CLIENTS concurrent
    keep-alive clients against `macao-ocr api`."""
    bodies = _job_bodies(manifest)
    api = start_api(db_url, redis_url, "bench-http-jobs", processes)
    try:
        return _run_http(
            f"POST /v1/jobs x{HTTP_CLIENTS} clients",
            api,
            "/v1/jobs",
            bodies,
            HTTP_CLIENTS,
            len(bodies),
            redis_url,
        )
    finally:
        api.stop()


Measure = Callable[[], Figure]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=200, help="distinct card files (0: all)")
    parser.add_argument("--chunk-rows", type=int, default=500)
    parser.add_argument(
        "--api-processes", type=int, default=HTTP_PROCESSES, help="uvicorn processes"
    )
    parser.add_argument(
        "--only", choices=["all", "python", "http"], default="all", help="which paths to run"
    )
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
            figures: list[Figure] = []
            if args.only in ("all", "python"):
                figures += [
                    measure_submit_many(manifest, db_url, args.redis_url, args.chunk_rows),
                    measure_manifest_cli(manifest, db_url, args.redis_url),
                ]
            if args.only in ("all", "http"):
                figures += [
                    measure_http_batches(manifest, db_url, args.redis_url, args.api_processes),
                    measure_http_jobs(manifest, db_url, args.redis_url, args.api_processes),
                ]
            for figure in figures:
                print(figure.line())
    finally:
        _fresh(args.redis_url)
        h.drop_database(args.pg_admin_url, db_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
