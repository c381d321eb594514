"""Prometheus metrics, correct across several worker processes.

Worker processes record through seven cheap functions (`job_finished`, `api_call`,
`limiter_wait`, `retry`, `decided`, `set_effective_rate`, `set_circuit`). With several
processes, prometheus-client's multiprocess mode is used: the launcher calls
`prepare_multiproc_dir()` and puts the directory in its children's PROMETHEUS_MULTIPROC_DIR
*before* they import prometheus_client (the library picks its value class at import), then
`serve_metrics()` serves the sum over every process.

Label values are bounded: statuses and error codes only, never job ids or personal data.
Queue depth and dead letters are not recorded by workers; a collector in the serving process
reads them at scrape time (Redis LLEN, one COUNT in SQL). So does the fleet's state: the
quota (settings), the shared limiter's effective rate and the account circuit (Redis), and the
launcher's live worker processes. Workers only set their own copies of the rate and circuit
gauges when a throttle or a pause changes them, and a multiprocess gauge reads 0 from the
moment it is created until it is set: served from the workers' files, the quota read 0 with
MACAO_OCR_QPS=5 until the first throttle, and nothing could alert on a rate that had never
changed. The serving process drops those copies and serves its scrape-time reading.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.broker.queue import queue_depth
from worker.errors import POLICY

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric
    from redis import Redis
    from sqlalchemy import Engine

    from worker.settings import Settings

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "macao_ocr"

# Tencent answers within ~0.2-3 s; the total timeout is 30 s.
API_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# Waits range from nothing (idle quota) to max_quota_wait_s (60 s by default).
LIMITER_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

JOB_STATUSES = frozenset({"queued", "running", "retrying", "succeeded", "failed"})
# Codes we make ourselves besides Tencent's: "OK", `Transport.HTTP502`, `Input.<rule>`, ...
_OWN_CODE = re.compile(r"^(OK|WorkerLost|Transport\.[A-Za-z0-9]{1,32}|Input\.[A-Za-z0-9_]{1,48})$")
# The shape of a Tencent code. Unknown codes are kept (they are rare and worth seeing) up to a
# cap, so a misbehaving endpoint cannot grow the label set without bound.
_CODE_SHAPE = re.compile(r"^[A-Z][A-Za-z0-9]{0,47}(\.[A-Za-z0-9]{1,48}){0,2}$")
MAX_UNKNOWN_CODES = 32
OTHER = "Other"


class CodeLabels:
    """Maps an outcome code to a bounded label value."""

    def __init__(self, max_unknown: int = MAX_UNKNOWN_CODES) -> None:
        self._max_unknown = max_unknown
        self._unknown: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, code: str) -> str:
        if code in POLICY or _OWN_CODE.match(code):
            return code
        if not _CODE_SHAPE.match(code):
            return OTHER
        with self._lock:
            if code in self._unknown:
                return code
            if len(self._unknown) < self._max_unknown:
                self._unknown.add(code)
                return code
        return OTHER


def status_label(status: str) -> str:
    """A job status as a bounded label value."""
    return status if status in JOB_STATUSES else OTHER


class _Metrics:
    """The worker-side metric objects, built once per process on first use."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.jobs_finished = Counter(
            "jobs_finished",
            "Jobs that reached a final status, by status.",
            ["status"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.api_calls = Counter(
            "api_calls",
            "RecognizeMacaoIDCardOCR calls, by outcome code (OK or the error code).",
            ["outcome_code"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.api_latency = Histogram(
            "api_latency_seconds",
            "Latency of one API call, signing to answer.",
            namespace=NAMESPACE,
            buckets=API_LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.limiter_wait = Histogram(
            "limiter_wait_seconds",
            "Time a granted call waited for its quota slot.",
            namespace=NAMESPACE,
            buckets=LIMITER_WAIT_BUCKETS_S,
            registry=reg,
        )
        self.retries = Counter(
            "retries",
            "Jobs scheduled for another attempt, by the code that caused it.",
            ["code"],
            namespace=NAMESPACE,
            registry=reg,
        )
        # The rate and the circuit are fleet-wide state in Redis that every process reads:
        # the latest reading is the truth, whichever process made it. `live` drops the
        # reading of a process that has exited (the launcher calls mark_process_dead).
        self.effective_rate = Gauge(
            "effective_rate_per_second",
            "Calls per second the shared limiter currently allows.",
            namespace=NAMESPACE,
            multiprocess_mode="livemostrecent",
            registry=reg,
        )
        # Configuration: identical in every process, so the maximum is the value.
        self.quota = Gauge(
            "quota_per_second",
            "Configured calls per second (MACAO_OCR_QPS).",
            namespace=NAMESPACE,
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.circuit_open = Gauge(
            "circuit_open",
            "1 while account-level errors pause every call, else 0.",
            namespace=NAMESPACE,
            multiprocess_mode="livemostrecent",
            registry=reg,
        )
        self.decisions = Counter(
            "decisions",
            "Succeeded jobs by decision (clear, consider, reject).",
            ["decision"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.decision_reasons = Counter(
            "decision_reasons",
            "Reasons of decisions, by code (warning names and check codes).",
            ["code"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.code_label = CodeLabels()


_lock = threading.Lock()
_metrics: _Metrics | None = None


def _get() -> _Metrics:
    # Built lazily so importing this module creates nothing and reads no environment.
    global _metrics
    current = _metrics
    if current is not None:
        return current
    with _lock:
        if _metrics is None:
            _metrics = _Metrics(None)
        return _metrics


def _safe(fn_name: str, exc: Exception) -> None:
    # A metrics failure (a full disk under the multiprocess dir, say) must never fail a job.
    log.warning("metrics_error", function=fn_name, error=type(exc).__name__)


def job_finished(status: str) -> None:
    """A job reached a final status (succeeded or failed)."""
    try:
        _get().jobs_finished.labels(status=status_label(status)).inc()
    except Exception as exc:
        _safe("job_finished", exc)


def api_call(outcome_code: str, latency_s: float) -> None:
    """One API call finished with `outcome_code` ("OK" or the error code) after `latency_s`."""
    try:
        m = _get()
        m.api_calls.labels(outcome_code=m.code_label(outcome_code)).inc()
        m.api_latency.observe(max(latency_s, 0.0))
    except Exception as exc:
        _safe("api_call", exc)


def limiter_wait(wait_s: float) -> None:
    """A granted reservation made the call wait `wait_s` for its slot."""
    try:
        _get().limiter_wait.observe(max(wait_s, 0.0))
    except Exception as exc:
        _safe("limiter_wait", exc)


def retry(code: str) -> None:
    """A job was scheduled for another attempt because of `code`."""
    try:
        m = _get()
        m.retries.labels(code=m.code_label(code)).inc()
    except Exception as exc:
        _safe("retry", exc)


def reason_label(code: str) -> str:
    """A reason code as a bounded label value (unknown warnings share one)."""
    from worker.reason_codes import BY_CODE, policy_key

    key = policy_key(code)
    return key if key in BY_CODE else OTHER


def decided(decision: str, codes: list[str]) -> None:
    """A succeeded job's decision and its reasons' codes."""
    try:
        m = _get()
        label = decision if decision in ("clear", "consider", "reject") else OTHER
        m.decisions.labels(decision=label).inc()
        for code in codes:
            m.decision_reasons.labels(code=reason_label(code)).inc()
    except Exception as exc:
        _safe("decided", exc)


def set_effective_rate(rate: float, quota: float) -> None:
    """The shared limiter's current rate and the configured quota, in calls per second."""
    try:
        m = _get()
        m.effective_rate.set(rate)
        m.quota.set(quota)
    except Exception as exc:
        _safe("set_effective_rate", exc)


def set_circuit(open_: bool) -> None:
    """The account circuit is open (every call paused) or closed."""
    try:
        _get().circuit_open.set(1.0 if open_ else 0.0)
    except Exception as exc:
        _safe("set_circuit", exc)


# -- multiprocess plumbing (the launcher's side)


def multiproc_dir(settings: Settings) -> str | None:
    """The multiprocess directory in use: settings first, then prometheus' own variable."""
    return settings.prometheus_multiproc_dir or os.environ.get(MULTIPROC_ENV) or None


def prepare_multiproc_dir(settings: Settings) -> str:
    """Create (or empty) the directory worker processes write their metric files to.

    The launcher calls this before starting children and passes the result as
    PROMETHEUS_MULTIPROC_DIR in their environment. Files left by an earlier run are removed:
    prometheus-client would otherwise add them to this run's counters.
    """
    path = multiproc_dir(settings)
    if path is None:
        path = tempfile.mkdtemp(prefix="macao-ocr-metrics-")
    os.makedirs(path, exist_ok=True)
    for entry in os.scandir(path):
        if entry.is_file() and entry.name.endswith(".db"):
            os.remove(entry.path)
    return path


def mark_process_dead(pid: int, path: str) -> None:
    """A child exited: drop its live gauges (its counters stay in the totals)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def remove_multiproc_dir(path: str) -> None:
    """Remove a directory made by `prepare_multiproc_dir` (at launcher shutdown)."""
    shutil.rmtree(path, ignore_errors=True)


# -- the serving side


# Gauges of fleet-wide state, read at scrape time by the serving process (FleetState).
SCRAPE_TIME_GAUGES = frozenset(
    f"{NAMESPACE}_{name}"
    for name in ("effective_rate_per_second", "quota_per_second", "circuit_open")
)


@dataclass
class FleetState:
    """What the serving process reads about the whole fleet at each scrape."""

    quota: float
    # The shared limiter's rate now (None: no state stored yet, i.e. never throttled).
    read_rate: Callable[[], float | None]
    # True while the account circuit pauses every call.
    read_circuit: Callable[[], bool]
    # Worker processes running under this launcher (None: not a launcher).
    alive: Callable[[], int] | None = None


class BacklogCollector(Collector):
    """Queue depth, dead letters and the fleet's state, read at scrape time (cheap reads)."""

    def __init__(
        self, redis_client: Redis, engine: Engine, queue: str, fleet: FleetState | None = None
    ) -> None:
        self._redis = redis_client
        self._engine = engine
        self._queue = queue
        self._fleet = fleet

    @property
    def reads_fleet(self) -> bool:
        """True when this collector serves the fleet's state gauges."""
        return self._fleet is not None

    def close(self) -> None:
        self._redis.close()
        self._engine.dispose()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_backlog_source_up",
            "1 if the last scrape could read the source (redis, database), else 0.",
            labels=["source"],
        )
        try:
            depth = queue_depth(self._redis, self._queue)
        except Exception as exc:
            log.warning("metrics_source_down", source="redis", error=type(exc).__name__)
            up.add_metric(["redis"], 0.0)
        else:
            up.add_metric(["redis"], 1.0)
            yield GaugeMetricFamily(
                f"{NAMESPACE}_queue_depth",
                "Messages waiting in the broker queue (not yet taken by a worker).",
                value=depth,
            )
        try:
            failed = count_failed_jobs(self._engine)
        except Exception as exc:
            log.warning("metrics_source_down", source="database", error=type(exc).__name__)
            up.add_metric(["database"], 0.0)
        else:
            up.add_metric(["database"], 1.0)
            yield GaugeMetricFamily(
                f"{NAMESPACE}_dead_letters",
                "Jobs in status failed (replayable with `macao-ocr replay`).",
                value=failed,
            )
        if self._fleet is not None:
            yield from self._collect_fleet(self._fleet, up)
        yield up

    def _collect_fleet(self, fleet: FleetState, up: GaugeMetricFamily) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{NAMESPACE}_quota_per_second",
            "Configured calls per second (MACAO_OCR_QPS; 0: no limiter).",
            value=fleet.quota,
        )
        if fleet.alive is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_workers_alive",
                "Worker processes running under this launcher.",
                value=fleet.alive(),
            )
        try:
            rate = fleet.read_rate()
            circuit = fleet.read_circuit()
        except Exception as exc:
            log.warning("metrics_source_down", source="state", error=type(exc).__name__)
            up.add_metric(["state"], 0.0)
            return
        up.add_metric(["state"], 1.0)
        yield GaugeMetricFamily(
            f"{NAMESPACE}_effective_rate_per_second",
            "Calls per second the shared limiter currently allows.",
            # Never throttled: the limiter runs at the quota.
            value=fleet.quota if rate is None else rate,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_circuit_open",
            "1 while account-level errors pause every call, else 0.",
            value=1.0 if circuit else 0.0,
        )


def count_failed_jobs(engine: Engine) -> int:
    """Dead letters: jobs whose status is failed."""
    import sqlalchemy as sa

    from models import Job, JobStatus

    with engine.connect() as conn:
        stmt = sa.select(sa.func.count()).select_from(Job).where(Job.status == JobStatus.failed)
        return int(conn.execute(stmt).scalar_one())


class _Forward(Collector):
    """Serves another source's metrics (minus the families named in `drop`)."""

    def __init__(self, source: Collector, drop: frozenset[str] = frozenset()) -> None:
        self._source = source
        self._drop = drop

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():
            if metric.name not in self._drop:
                yield metric


def fleet_state(settings: Settings, alive: Callable[[], int] | None = None) -> FleetState:
    """The fleet's state as this deployment's Redis holds it."""
    from worker.quota.circuit_redis import read_pause_sync
    from worker.quota.limiter import limiter_key
    from worker.quota.limiter_redis import effective_rate_sync

    def read_rate() -> float | None:
        if settings.qps == 0:
            return 0.0
        from worker.tencent.client import ClientConfig

        config = ClientConfig.from_settings(settings)
        key = limiter_key(config.secret_id, config.action, config.endpoint)
        return effective_rate_sync(settings.state_redis_url, key)

    def read_circuit() -> bool:
        return read_pause_sync(settings.state_redis_url) is not None

    return FleetState(settings.qps, read_rate, read_circuit, alive)


def backlog_collector(
    settings: Settings, alive: Callable[[], int] | None = None
) -> BacklogCollector:
    """A BacklogCollector reading the broker's Redis, the jobs database and the fleet state."""
    import redis

    from worker.broker.publish import QUEUE
    from worker.store.engine import make_engine

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
    # One connection is plenty for one COUNT per scrape (SQLite ignores pool sizes).
    engine = make_engine(settings, pool_size=1, max_overflow=1)
    return BacklogCollector(client, engine, QUEUE, fleet_state(settings, alive))


def build_registry(settings: Settings, *extra: Collector) -> CollectorRegistry:
    """A registry to serve: every process's metrics in multiprocess mode, else this one's.

    When an extra collector reads the fleet's state at scrape time, the workers' own copies
    of those gauges are dropped (one family, one source).
    """
    # auto_describe off: collectors are only asked for samples at scrape time.
    registry = CollectorRegistry(auto_describe=False)
    fleet = any(isinstance(c, BacklogCollector) and c.reads_fleet for c in extra)
    drop = SCRAPE_TIME_GAUGES if fleet else frozenset()
    path = multiproc_dir(settings)
    source: Collector = REGISTRY
    if path is not None:
        source = multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
    registry.register(_Forward(source, drop))
    for collector in extra:
        registry.register(collector)
    return registry


@dataclass
class MetricsServer:
    """A running /metrics HTTP server (a daemon thread); `close()` stops it."""

    server: WSGIServer
    thread: threading.Thread
    address: str
    port: int
    backlog: BacklogCollector | None = None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        if self.backlog is not None:
            self.backlog.close()


def serve_metrics(
    settings: Settings,
    *,
    address: str | None = None,
    port: int | None = None,
    alive: Callable[[], int] | None = None,
) -> MetricsServer | None:
    """Serve /metrics on `address`:`port` (default settings.metrics_host, 127.0.0.1, and
    settings.metrics_port; 0 there means off) in a thread.

    With a multiprocess directory this serves the aggregate of every worker process; the
    launcher calls it once, with `alive` counting its worker processes. Without one, a
    process serves only its own metrics. A busy port raises OSError (nothing left open).
    """
    chosen = settings.metrics_port if port is None else port
    if chosen == 0 and port is None:
        return None
    address = settings.metrics_host if address is None else address
    backlog = backlog_collector(settings, alive)
    registry = build_registry(settings, backlog)
    try:
        server, thread = start_http_server(chosen, addr=address, registry=registry)
    except OSError:
        backlog.close()
        raise
    bound = int(server.server_address[1])
    log.info(
        "metrics_serving",
        address=address,
        port=bound,
        multiprocess=multiproc_dir(settings) is not None,
    )
    return MetricsServer(server=server, thread=thread, address=address, port=bound, backlog=backlog)
