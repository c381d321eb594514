"""What every `bench.quota` mode shares: a scenario, the run's context, a worker's
environment, and waiting for the fleet's first paid call (below the modes, so none of them
imports another)."""

from __future__ import annotations

import argparse
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import _harness as h

# Realistic API latency: median 400 ms, lognormal spread, 1% of calls 5x slower.
QUOTA_LATENCY = {
    "latency_median_ms": 400.0,
    "latency_sigma": 0.3,
    "latency_tail_prob": 0.01,
    "latency_tail_mult": 5.0,
}
# The throughput mode: ~300 ms, nearly fixed.
NOQUOTA_LATENCY = {
    "latency_median_ms": 300.0,
    "latency_sigma": 0.05,
    "latency_tail_prob": 0.0,
    "latency_tail_mult": 1.0,
}
FIRST_CALL_TIMEOUT_S = 120.0
POLL_S = 0.5


@dataclass(frozen=True)
class Scenario:
    mode: str  # quota | mismatch | noquota | brokerloss
    impl: str  # ours | baseline
    processes: int  # ours: OS processes; baseline: celery worker instances
    limiter_qps: float  # what the workers are configured with (0: no limit)
    emulator_quota: int  # what the emulator enforces (0: none)
    jobs: int
    duration_s: int  # brokerloss: steady seconds before the loss

    @property
    def latency(self) -> dict[str, float]:
        return NOQUOTA_LATENCY if self.mode == "noquota" else QUOTA_LATENCY

    @property
    def label(self) -> str:
        if self.mode == "noquota":
            return "noquota"
        if self.mode == "mismatch":
            return f"Q={self.limiter_qps:g}/real {self.emulator_quota}"
        return f"Q={self.emulator_quota}"


@dataclass
class Context:
    args: argparse.Namespace
    run_dir: Path
    emulator: h.Emulator
    images: list[bytes]
    verdicts: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    failed: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scenario_env(ctx: Context, sc: Scenario, db_url: str, tag: str) -> dict[str, str]:
    env = {
        "MACAO_OCR_DATABASE_URL": db_url,
        "MACAO_OCR_BROKER_URL": ctx.args.redis_url,
        "MACAO_OCR_QPS": f"{sc.limiter_qps:g}",
        "MACAO_OCR_LOG_LEVEL": ctx.args.loglevel,
        # Production-like (the launcher serves /metrics), on a port nobody else uses.
        "MACAO_OCR_METRICS_PORT": str(free_port()),
        "MACAO_OCR_PROMETHEUS_MULTIPROC_DIR": str(ctx.run_dir / f"metrics-{tag}"),
        "MACAO_OCR_BROKER_TWEAKS": "true" if ctx.args.broker_tweaks else "false",
    }
    env.update(ctx.emulator.env())
    return env


def wait_first_accepted(ctx: Context, fleet: h.Fleet, log_path: Path) -> int:
    deadline = time.monotonic() + FIRST_CALL_TIMEOUT_S
    while time.monotonic() < deadline:
        if not fleet.alive():
            raise RuntimeError(f"a worker process exited before any call; see {log_path}")
        first = h.first_accepted_second(h.parse_windows(ctx.emulator.counters()["windows"]))
        if first is not None:
            return first
        time.sleep(POLL_S)
    raise RuntimeError(f"no accepted call within {FIRST_CALL_TIMEOUT_S:.0f} s; see {log_path}")
