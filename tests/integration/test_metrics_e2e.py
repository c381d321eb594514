"""Metrics end to end: `macao-ocr worker --processes 2` (the real launcher, multiprocess mode)
runs a batch with known outcomes; the scraped counters equal what happened, and so does
`macao-ocr stats --json`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from emulator.specimen import make_specimen
from tests.fixtures.workers import cli_env, wait_terminal

pytestmark = pytest.mark.integration

MACAO_OCR = str(Path(sys.executable).parent / "macao-ocr")
N_OK = 6
M_PERMANENT = 3
NO_CARD = "FailedOperation.ImageNoSpecifiedCard"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def not_a_card(seed: int) -> bytes:
    """A valid JPEG that is no ID card: the API answers ImageNoSpecifiedCard."""
    img = Image.new("RGB", (640, 400), (seed % 256, 120, 200))
    out = io.BytesIO()
    img.save(out, "JPEG")
    return out.getvalue()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Launcher:
    """`macao-ocr worker` as a subprocess (it starts and supervises the celery processes)."""

    def __init__(self, env: Mapping[str, str], log: Path, processes: int) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [MACAO_OCR, "worker", "--processes", str(processes), "--concurrency", "2"],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def launcher_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = cli_env(worker_env)
    env["MACAO_OCR_METRICS_PORT"] = str(free_port())
    env["MACAO_OCR_PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    return env


@pytest.fixture
def launcher(launcher_env: dict[str, str], tmp_path: Path) -> Iterator[Launcher]:
    running = Launcher(launcher_env, tmp_path / "launcher.log", processes=2)
    yield running
    running.stop()


def wait_workers(env: Mapping[str, str], launcher: Launcher, n: int) -> None:
    from celery import Celery

    app = Celery("f_ping", broker=env["MACAO_OCR_BROKER_URL"], set_as_current=False)
    deadline = time.monotonic() + 60
    try:
        while True:
            if launcher.proc.poll() is not None:
                pytest.fail(f"launcher exited:\n{launcher.log.read_text()[-3000:]}")
            replies = app.control.ping(timeout=1.0) or []
            if len(replies) >= n:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{len(replies)} of {n} workers:\n{launcher.log.read_text()[-3000:]}")
    finally:
        app.close()


def test_counters_equal_what_happened(
    launcher: Launcher, launcher_env: dict[str, str], emulator: Any, tmp_path: Path
) -> None:
    env = launcher_env
    url = f"http://127.0.0.1:{env['MACAO_OCR_METRICS_PORT']}/metrics"
    # Some latency so both processes hold jobs at once (each reserves only what it can run).
    emulator.configure(latency_median_ms=150)
    wait_workers(env, launcher, 2)

    rows = ["front"]
    images = [make_specimen(seed=900 + i).image for i in range(N_OK)]
    images += [not_a_card(i) for i in range(M_PERMANENT)]
    for i, data in enumerate(images):
        (tmp_path / f"img-{i}.jpg").write_bytes(data)
        rows.append(f"img-{i}.jpg")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    done = subprocess.run(
        [MACAO_OCR, "submit", "--manifest", str(tmp_path / "manifest.csv"), "--json"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    job_ids = [json.loads(line)["job_id"] for line in done.stdout.decode().splitlines()]
    statuses = wait_terminal(env["MACAO_OCR_DATABASE_URL"], job_ids)
    assert sorted(statuses.values()) == ["failed"] * M_PERMANENT + ["succeeded"] * N_OK

    # Both processes recorded: the numbers below are sums over processes, not one's view.
    counter_files = list(Path(env["MACAO_OCR_PROMETHEUS_MULTIPROC_DIR"]).glob("counter_*.db"))
    assert len(counter_files) == 2, counter_files

    m = scrape(url)

    def v(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    calls = emulator.counters()
    assert calls["total"] == N_OK + M_PERMANENT
    assert v("macao_ocr_jobs_finished_total", status="succeeded") == N_OK
    assert v("macao_ocr_jobs_finished_total", status="failed") == M_PERMANENT
    assert v("macao_ocr_api_calls_total", outcome_code="OK") == N_OK
    assert v("macao_ocr_api_calls_total", outcome_code=NO_CARD) == M_PERMANENT
    api_total = sum(val for (name, _), val in m.items() if name == "macao_ocr_api_calls_total")
    assert api_total == calls["total"]
    assert v("macao_ocr_api_latency_seconds_count") == calls["total"]
    # The emulator held each call ~150 ms: the latency histogram saw it.
    assert v("macao_ocr_api_latency_seconds_sum") > 0.05 * calls["total"]
    assert v("macao_ocr_limiter_wait_seconds_count") == calls["total"]
    assert sum(val for (name, _), val in m.items() if name == "macao_ocr_retries_total") == 0
    assert v("macao_ocr_dead_letters") == M_PERMANENT
    assert v("macao_ocr_queue_depth") == 0
    assert v("macao_ocr_backlog_source_up", source="redis") == 1
    assert v("macao_ocr_backlog_source_up", source="database") == 1
    # No label carries a job id.
    assert not any(j in str(key) for key in m for j in job_ids)

    # `stats --json` tells a person the same story, from SQL and Redis.
    out = subprocess.run([MACAO_OCR, "stats", "--json"], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    stats = json.loads(out.stdout)
    assert stats["jobs_by_status"]["succeeded"] == N_OK
    assert stats["jobs_by_status"]["failed"] == M_PERMANENT
    assert stats["dead_letters"] == M_PERMANENT
    assert stats["queue_depth"] == 0
    assert stats["calls_by_outcome"] == {"OK": N_OK, NO_CARD: M_PERMANENT}
    assert stats["calls_in_window"] == calls["total"]
    assert stats["latency_p50_ms"] >= 50
    assert stats["latency_p99_ms"] >= stats["latency_p50_ms"]
    assert stats["circuit"] == {"open": False, "code": None, "message": None, "since": None}
    assert stats["problems"] == []

    human = subprocess.run([MACAO_OCR, "stats"], env=env, capture_output=True, timeout=60)
    assert human.returncode == 0, human.stderr.decode()
    assert NO_CARD in human.stdout.decode() and "dead letters" in human.stdout.decode()


def test_queue_depth_counts_waiting_messages(launcher_env: dict[str, str], tmp_path: Path) -> None:
    """No worker running: submitted jobs wait in the broker, and both views count them."""
    from worker.metrics import serve_metrics
    from worker.settings import Settings

    (tmp_path / "a.jpg").write_bytes(make_specimen(seed=950).image)
    (tmp_path / "m.csv").write_text("front\na.jpg\na.jpg\n")
    done = subprocess.run(
        [MACAO_OCR, "submit", "--manifest", str(tmp_path / "m.csv"), "--json"],
        env=launcher_env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    settings = Settings(
        broker_url=launcher_env["MACAO_OCR_BROKER_URL"],
        database_url=launcher_env["MACAO_OCR_DATABASE_URL"],
        prometheus_multiproc_dir=str(tmp_path / "empty"),
    )
    (tmp_path / "empty").mkdir()
    server = serve_metrics(settings, address="127.0.0.1", port=0)
    assert server is not None
    try:
        m = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
    assert m[("macao_ocr_queue_depth", ())] == 2
    assert m[("macao_ocr_dead_letters", ())] == 0

    # An account-level error paused the fleet: stats names the code and the reason.
    import asyncio

    import redis.asyncio

    from worker.quota.circuit_redis import RedisAccountCircuit

    async def pause() -> None:
        client = redis.asyncio.Redis.from_url(launcher_env["MACAO_OCR_BROKER_URL"])
        try:
            await RedisAccountCircuit(client).open("FailedOperation.UnOpenError", "not opened")
        finally:
            await client.aclose()

    asyncio.run(pause())
    out = subprocess.run(
        [MACAO_OCR, "stats", "--json"], env=launcher_env, capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode()
    stats = json.loads(out.stdout)
    assert stats["queue_depth"] == 2
    assert stats["jobs_by_status"]["queued"] == 2
    assert stats["calls_in_window"] == 0 and stats["latency_p50_ms"] is None
    assert stats["circuit"]["open"] is True
    assert stats["circuit"]["code"] == "FailedOperation.UnOpenError"
    human = subprocess.run([MACAO_OCR, "stats"], env=launcher_env, capture_output=True, timeout=60)
    assert human.returncode == 0, human.stderr.decode()
    assert "OPEN" in human.stdout.decode() and "UnOpenError" in human.stdout.decode()


# -- the fleet's gauges from the first scrape, and the README's alerts on a real scrape


Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


def alert_circuit_open(m: Samples) -> bool:
    """README: `macao_ocr_circuit_open == 1`."""
    return m[("macao_ocr_circuit_open", ())] == 1


def alert_rate_below_quota(m: Samples) -> bool:
    """README: `macao_ocr_effective_rate_per_second < macao_ocr_quota_per_second`."""
    return m[("macao_ocr_effective_rate_per_second", ())] < m[("macao_ocr_quota_per_second", ())]


def first_scrape(
    url: str, launcher: Launcher
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + 60
    while True:
        if launcher.proc.poll() is not None:
            pytest.fail(f"launcher exited:\n{launcher.log.read_text()[-3000:]}")
        try:
            return scrape(url)
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"no /metrics:\n{launcher.log.read_text()[-3000:]}")
            time.sleep(0.1)


def test_fleet_gauges_are_set_from_the_first_scrape_and_alerts_fire(
    launcher_env: dict[str, str], tmp_path: Path
) -> None:
    import asyncio

    import redis.asyncio

    from worker.quota.circuit_redis import RedisAccountCircuit
    from worker.quota.limiter import limiter_key
    from worker.quota.limiter_redis import RedisRateLimiter
    from worker.settings import load_settings
    from worker.tencent.client import ClientConfig

    env = {**launcher_env, "MACAO_OCR_QPS": "5"}
    url = f"http://127.0.0.1:{env['MACAO_OCR_METRICS_PORT']}/metrics"
    running = Launcher(env, tmp_path / "launcher.log", processes=2)
    try:
        # Before any worker is ready and before any job: every fleet gauge has its value.
        m = first_scrape(url, running)
        assert m[("macao_ocr_quota_per_second", ())] == 5
        assert m[("macao_ocr_effective_rate_per_second", ())] == 5
        assert m[("macao_ocr_circuit_open", ())] == 0
        assert m[("macao_ocr_queue_depth", ())] == 0
        assert m[("macao_ocr_dead_letters", ())] == 0
        assert ("macao_ocr_workers_alive", ()) in m
        assert not alert_circuit_open(m) and not alert_rate_below_quota(m)

        wait_workers(env, running, 2)
        # A job makes a worker build its metric objects (its own quota gauge starts at 0).
        (tmp_path / "card.jpg").write_bytes(make_specimen(seed=960).image)
        done = subprocess.run(
            [MACAO_OCR, "submit", str(tmp_path / "card.jpg")], env=env, capture_output=True
        )
        assert done.returncode == 0, done.stderr.decode()
        wait_terminal(env["MACAO_OCR_DATABASE_URL"], [done.stdout.decode().strip()])
        m = scrape(url)
        assert m[("macao_ocr_api_calls_total", (("outcome_code", "OK"),))] == 1
        assert m[("macao_ocr_quota_per_second", ())] == 5
        # Two OCR processes and the webhook delivery process.
        assert m[("macao_ocr_workers_alive", ())] == 3
        # One family, one sample each: the workers' own copies are not served beside them.
        for name in ("macao_ocr_quota_per_second", "macao_ocr_effective_rate_per_second"):
            assert [k for k in m if k[0] == name] == [(name, ())]

        settings = load_settings(qps=5.0, broker_url=env["MACAO_OCR_BROKER_URL"])
        config = ClientConfig.from_settings(
            load_settings(
                secret_id=env["TENCENTCLOUD_SECRET_ID"],
                secret_key=env["TENCENTCLOUD_SECRET_KEY"],
                api_endpoint=env["MACAO_OCR_API_ENDPOINT"],
            )
        )
        key = limiter_key(config.secret_id, config.action, config.endpoint)

        async def throttle_and_pause() -> None:
            client = redis.asyncio.Redis.from_url(env["MACAO_OCR_BROKER_URL"])
            try:
                await RedisRateLimiter.from_settings(settings, client).throttled(key)
                await RedisAccountCircuit(client).open("FailedOperation.UnOpenError", "x")
            finally:
                await client.aclose()

        asyncio.run(throttle_and_pause())
        m = scrape(url)
        assert m[("macao_ocr_effective_rate_per_second", ())] < 5
        assert alert_rate_below_quota(m)
        assert alert_circuit_open(m)
    finally:
        running.stop()
