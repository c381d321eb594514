"""Metrics: bounded labels, correct sums across real processes, backlog read at scrape time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import fakeredis
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from models import Base, JobStatus
from tests.fixtures.workers import sealed_job
from worker import metrics
from worker.broker.queue import queue_keys
from worker.settings import Settings


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    """The module's functions recording into a registry of this test's own."""
    reg = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics._Metrics(reg))
    return reg


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_functions_record(registry: CollectorRegistry) -> None:
    metrics.job_finished("succeeded")
    metrics.job_finished("succeeded")
    metrics.job_finished("failed")
    metrics.api_call("OK", 0.3)
    metrics.api_call("FailedOperation.OcrFailed", 1.2)
    metrics.api_call("Transport.HTTP502", 0.01)
    metrics.limiter_wait(0.4)
    metrics.retry("FailedOperation.OcrFailed")
    metrics.set_effective_rate(4.0, 5.0)
    metrics.set_circuit(True)

    assert value(registry, "macao_ocr_jobs_finished_total", status="succeeded") == 2
    assert value(registry, "macao_ocr_jobs_finished_total", status="failed") == 1
    assert value(registry, "macao_ocr_api_calls_total", outcome_code="OK") == 1
    assert (
        value(registry, "macao_ocr_api_calls_total", outcome_code="FailedOperation.OcrFailed") == 1
    )
    assert value(registry, "macao_ocr_api_calls_total", outcome_code="Transport.HTTP502") == 1
    assert value(registry, "macao_ocr_api_latency_seconds_count") == 3
    assert value(registry, "macao_ocr_api_latency_seconds_sum") == pytest.approx(1.51)
    assert value(registry, "macao_ocr_api_latency_seconds_bucket", le="0.5") == 2
    assert value(registry, "macao_ocr_limiter_wait_seconds_count") == 1
    assert value(registry, "macao_ocr_retries_total", code="FailedOperation.OcrFailed") == 1
    assert value(registry, "macao_ocr_effective_rate_per_second") == 4.0
    assert value(registry, "macao_ocr_quota_per_second") == 5.0
    assert value(registry, "macao_ocr_circuit_open") == 1.0
    metrics.set_circuit(False)
    assert value(registry, "macao_ocr_circuit_open") == 0.0


def test_labels_are_bounded(registry: CollectorRegistry) -> None:
    job_id = str(uuid.uuid4())
    metrics.job_finished(job_id)
    metrics.api_call(job_id, 0.1)
    metrics.api_call("1234567(8)", 0.1)
    metrics.retry("chan tai man")
    text = generate_latest(registry).decode()
    assert job_id not in text and "1234567" not in text and "chan" not in text
    assert value(registry, "macao_ocr_jobs_finished_total", status="Other") == 1
    assert value(registry, "macao_ocr_api_calls_total", outcome_code="Other") == 2
    assert value(registry, "macao_ocr_retries_total", code="Other") == 1


def test_unknown_codes_are_kept_up_to_a_cap() -> None:
    labels = metrics.CodeLabels(max_unknown=2)
    assert labels("FailedOperation.NewThing") == "FailedOperation.NewThing"
    assert labels("Weird.Code") == "Weird.Code"
    assert labels("Another.Code") == metrics.OTHER
    assert labels("FailedOperation.NewThing") == "FailedOperation.NewThing"
    # Known codes and our own never count against the cap.
    assert labels("FailedOperation.ImageNoSpecifiedCard") == "FailedOperation.ImageNoSpecifiedCard"
    assert labels("Input.image_too_large") == "Input.image_too_large"


def test_a_failing_metric_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __getattr__(self, name: str) -> object:
            raise OSError("disk full")

    monkeypatch.setattr(metrics, "_metrics", Broken())
    metrics.job_finished("succeeded")
    metrics.api_call("OK", 0.1)
    metrics.set_circuit(True)


CHILD = textwrap.dedent(
    """
    import sys
    from worker import metrics
    n = int(sys.argv[1])
    for _ in range(n):
        metrics.api_call("OK", 0.2)
        metrics.job_finished("succeeded")
    metrics.api_call("FailedOperation.ImageNoSpecifiedCard", 0.1)
    metrics.job_finished("failed")
    metrics.set_effective_rate(float(sys.argv[2]), 5.0)
    metrics.set_circuit(False)
    print("done", flush=True)
    """
)


def run_children(path: Path, counts: list[int], rate: float = 1.0) -> list[int]:
    """Run one real process per count, all at once, recording into `path`."""
    env = {**os.environ, metrics.MULTIPROC_ENV: str(path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(n), str(rate)], env=env, stdout=subprocess.PIPE
        )
        for n in counts
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.strip() == b"done"
    return [proc.pid for proc in procs]


def test_multiprocess_sums_every_process(tmp_path: Path) -> None:
    settings = Settings(prometheus_multiproc_dir=str(tmp_path / "mp"))
    path = Path(metrics.prepare_multiproc_dir(settings))
    pids = run_children(path, [3, 4, 5], rate=4.0)
    # Then one more, later: its reading of the shared rate is the most recent.
    pids += run_children(path, [0], rate=2.5)
    reg = metrics.build_registry(settings)

    failed_code = "FailedOperation.ImageNoSpecifiedCard"
    assert value(reg, "macao_ocr_api_calls_total", outcome_code="OK") == 12
    assert value(reg, "macao_ocr_api_calls_total", outcome_code=failed_code) == 4
    assert value(reg, "macao_ocr_jobs_finished_total", status="succeeded") == 12
    assert value(reg, "macao_ocr_jobs_finished_total", status="failed") == 4
    assert value(reg, "macao_ocr_api_latency_seconds_count") == 16
    assert value(reg, "macao_ocr_api_latency_seconds_sum") == pytest.approx(12 * 0.2 + 4 * 0.1)
    assert value(reg, "macao_ocr_quota_per_second") == 5.0
    assert value(reg, "macao_ocr_effective_rate_per_second") == 2.5

    # An exited process's live gauges go; its counters stay in the totals.
    for pid in pids:
        metrics.mark_process_dead(pid, str(path))
    reg = metrics.build_registry(settings)
    assert reg.get_sample_value("macao_ocr_quota_per_second") is None
    assert value(reg, "macao_ocr_api_calls_total", outcome_code="OK") == 12


def test_prepare_wipes_an_earlier_run(tmp_path: Path) -> None:
    settings = Settings(prometheus_multiproc_dir=str(tmp_path))
    run_children(Path(metrics.prepare_multiproc_dir(settings)), [7])
    run_children(Path(metrics.prepare_multiproc_dir(settings)), [2])
    reg = metrics.build_registry(settings)
    assert value(reg, "macao_ocr_api_calls_total", outcome_code="OK") == 2


def test_prepare_makes_a_directory_when_none_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    path = metrics.prepare_multiproc_dir(Settings(prometheus_multiproc_dir=None))
    try:
        assert os.path.isdir(path) and not os.listdir(path)
    finally:
        metrics.remove_multiproc_dir(path)
    assert not os.path.exists(path)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    return engine


def add_jobs(engine: sa.Engine, status: JobStatus, n: int) -> None:
    with sa.orm.Session(engine) as session:
        for _ in range(n):
            session.add(sealed_job(status=status, front_url="https://example.invalid/a.png"))
        session.commit()


def test_backlog_collector_reads_queue_and_dead_letters(sqlite_engine: sa.Engine) -> None:
    client = fakeredis.FakeRedis()
    client.rpush("macao-ocr", b"m1", b"m2", b"m3")
    client.rpush(queue_keys("macao-ocr")[2], b"m4")
    client.rpush("other-queue", b"x")
    add_jobs(sqlite_engine, JobStatus.failed, 4)
    add_jobs(sqlite_engine, JobStatus.succeeded, 2)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.BacklogCollector(client, sqlite_engine, "macao-ocr"))

    assert value(reg, "macao_ocr_queue_depth") == 4
    assert value(reg, "macao_ocr_dead_letters") == 4
    assert value(reg, "macao_ocr_backlog_source_up", source="redis") == 1
    add_jobs(sqlite_engine, JobStatus.failed, 1)
    client.lpop("macao-ocr")
    assert value(reg, "macao_ocr_dead_letters") == 5
    assert value(reg, "macao_ocr_queue_depth") == 3


def test_backlog_collector_reports_a_source_down(sqlite_engine: sa.Engine) -> None:
    import redis

    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.BacklogCollector(down, sqlite_engine, "macao-ocr"))
    assert reg.get_sample_value("macao_ocr_queue_depth") is None
    assert value(reg, "macao_ocr_backlog_source_up", source="redis") == 0
    assert value(reg, "macao_ocr_backlog_source_up", source="database") == 1


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_serve_metrics_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    db = tmp_path / "jobs.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(engine)
    add_jobs(engine, JobStatus.failed, 2)
    settings = Settings(database_url=f"sqlite:///{db}", broker_url="redis://127.0.0.1:1/0")
    key = "macao_ocr_jobs_finished_total[('status', 'succeeded')]"

    server = metrics.serve_metrics(settings, address="127.0.0.1", port=0)
    assert server is not None
    try:
        before = scrape(server.port).get(key, 0.0)
        metrics.job_finished("succeeded")
        after = scrape(server.port)
    finally:
        server.close()
    assert after[key] == before + 1
    assert after["macao_ocr_dead_letters[]"] == 2
    assert after["macao_ocr_backlog_source_up[('source', 'redis')]"] == 0


def test_metrics_port_zero_means_off() -> None:
    assert metrics.serve_metrics(Settings(metrics_port=0)) is None


def test_decisions_are_counted_by_outcome_and_reason_code(registry: CollectorRegistry) -> None:
    metrics.decided("reject", ["photocopy", "card_expired"])
    metrics.decided("consider", ["unknown_-9105", "unknown_-9106"])
    metrics.decided("clear", [])
    for outcome in ("reject", "consider", "clear"):
        assert value(registry, "macao_ocr_decisions_total", decision=outcome) == 1
    assert value(registry, "macao_ocr_decision_reasons_total", code="photocopy") == 1
    assert value(registry, "macao_ocr_decision_reasons_total", code="card_expired") == 1
    # Unknown warnings share one label: the label set stays bounded.
    assert value(registry, "macao_ocr_decision_reasons_total", code="unknown_warning") == 2
    metrics.decided("bogus", ["not-a-code"])
    assert value(registry, "macao_ocr_decisions_total", decision="Other") == 1
    assert value(registry, "macao_ocr_decision_reasons_total", code="Other") == 1
