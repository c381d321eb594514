"""Plumbing for bench/quota.py: databases, Redis, the emulator, worker fleets, measurements.

Everything a scenario starts is a real process (emulator, `macao-ocr worker`, `celery worker`)
on real Redis and PostgreSQL; everything measured comes from the emulator's own counters
(calls per 1-second window, as the API counts them) and from SQL (when results were stored).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from emulator.config import CONTROL_TOKEN_ENV, CONTROL_TOKEN_HEADER

REPO_ROOT = Path(__file__).resolve().parents[1]
EMULATOR_READY_PREFIX = "EMULATOR_READY "
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
MAX_SPECIMEN_BYTES = 60_000  # "60 KB or less", read strictly
_LEAKY_PREFIXES = ("MACAO_OCR_", "TENCENTCLOUD_", "PROMETHEUS_MULTIPROC_DIR")


# ------------------------------------------------------------------ services


def create_database(admin_url: str, prefix: str) -> str:
    """A new empty PostgreSQL database, migrated to head; returns its URL."""
    import migrations

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrations.upgrade(url)
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = sa.make_url(url).database
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


_KEYS: dict[str, str] = {}


def keys_env() -> dict[str, str]:
    """The run's own data key ring and lookup key (made once per bench process, never
    printed): every scenario's producer and workers encrypt as production does."""
    if not _KEYS:
        from worker.privacy.crypto import generate_entry, generate_lookup_key

        _KEYS["MACAO_OCR_DATA_KEYS"] = generate_entry("bench")
        _KEYS["MACAO_OCR_LOOKUP_KEY"] = generate_lookup_key()
    return dict(_KEYS)


def clean_environ() -> dict[str, str]:
    """os.environ without this project's variables (the scenario sets its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


# ------------------------------------------------------------------ the emulator


@dataclass
class Emulator:
    """`python -m emulator` on a free port, reconfigured between scenarios."""

    url: str
    secret_id: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    # What the control endpoints (/__emulator__/config, counters, reset) require.
    control_token: str = ""

    @classmethod
    def start(cls, log_path: Path, seed: int | None = None) -> Emulator:
        secret_id = "AKIDbench" + secrets.token_hex(8)
        secret_key = secrets.token_hex(16)
        env = {k: v for k, v in clean_environ().items() if not k.startswith("MACAO_OCR_EMULATOR_")}
        env["TENCENTCLOUD_SECRET_ID"] = secret_id
        env["TENCENTCLOUD_SECRET_KEY"] = secret_key
        control_token = secrets.token_urlsafe(24)
        env[CONTROL_TOKEN_ENV] = control_token
        args = [sys.executable, "-m", "emulator", "--port", "0", "--host", "127.0.0.1"]
        if seed is not None:
            args += ["--seed", str(seed)]
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            lines = log_path.read_text(errors="replace").splitlines()
            ready = [line for line in lines if line.startswith(EMULATOR_READY_PREFIX)]
            if ready:
                url = ready[0][len(EMULATOR_READY_PREFIX) :].strip()
                return cls(
                    url=url, secret_id=secret_id, secret_key=secret_key, proc=proc,
                    control_token=control_token,
                )  # fmt: skip
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_tree(proc)
                raise RuntimeError("emulator did not start:\n" + "\n".join(lines[-20:]))
            time.sleep(0.05)

    def _call(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json", CONTROL_TOKEN_HEADER: self.control_token},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def configure(self, **knobs: Any) -> None:
        self._call("POST", "/__emulator__/config", knobs)

    def reset(self) -> None:
        """Counters and quota windows cleared (knobs kept)."""
        self._call("POST", "/__emulator__/reset")

    def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/__emulator__/counters")
        return result

    def env(self) -> dict[str, str]:
        return {
            "MACAO_OCR_API_ENDPOINT": self.url,
            "TENCENTCLOUD_SECRET_ID": self.secret_id,
            "TENCENTCLOUD_SECRET_KEY": self.secret_key,
            **keys_env(),
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill_tree(self.proc)


# ------------------------------------------------------------------ jobs


def specimen_pool(n: int, seed: int = 4) -> list[bytes]:
    """`n` distinct specimen JPEGs of at most 60 KB (larger draws are skipped)."""
    from emulator.specimen import make_specimen

    images: list[bytes] = []
    draw = seed * 100_000
    while len(images) < n:
        image = make_specimen(draw).image
        draw += 1
        if len(image) <= MAX_SPECIMEN_BYTES:
            images.append(image)
        if draw > seed * 100_000 + 20 * n:
            raise RuntimeError(f"could not draw {n} specimens of at most {MAX_SPECIMEN_BYTES} B")
    return images


def enqueue(
    settings_env: Mapping[str, str], images: Sequence[bytes], n_jobs: int, *, baseline: bool
) -> float:
    """Submit `n_jobs` through the real producer (commit, then publish); returns seconds taken."""
    from worker.privacy.seal import Sealer
    from worker.producer import JobSpec, submit_many
    from worker.settings import Settings
    from worker.store.engine import make_engine, make_sessionmaker

    settings = Settings(**_settings_kwargs(settings_env))
    engine = make_engine(settings)
    if baseline:
        from bench.baseline_app import BaselinePublisher
        from bench.baseline_app import create_app as create_baseline_app

        app: Any = create_baseline_app(settings)
        publisher: Any = BaselinePublisher(app)
    else:
        from worker.app import create_app
        from worker.broker.publish import CeleryPublisher

        app = create_app(settings)
        publisher = CeleryPublisher(app)
    specs = [JobSpec(front=images[i % len(images)]) for i in range(n_jobs)]
    started = time.monotonic()
    try:
        submit_many(
            make_sessionmaker(engine),
            publisher,
            settings,
            specs,
            batch="bench",
            sealer=Sealer.from_settings(settings),
        )
    finally:
        app.close()
        engine.dispose()
    return time.monotonic() - started


def _settings_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings fields from MACAO_OCR_* / TENCENTCLOUD_* variables (no os.environ read)."""
    from worker.settings import ENV_PREFIX, Settings

    kwargs: dict[str, Any] = {}
    for name in Settings.model_fields:
        for var in (ENV_PREFIX + name.upper(), "TENCENTCLOUD_" + name.upper()):
            if var in env:
                kwargs[name] = env[var]
    return kwargs


# ------------------------------------------------------------------ worker fleets


@dataclass
class Fleet:
    """Worker processes of one scenario; output goes to `log_path`."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_path: Path | None = None

    @classmethod
    def ours(
        cls, env: Mapping[str, str], log_path: Path, processes: int, concurrency: int | None
    ) -> Fleet:
        """`macao-ocr worker --processes N`: the launcher and its N celery children."""
        # The installed console script, next to this interpreter (no worker.cli __main__).
        launcher = str(Path(sys.executable).with_name("macao-ocr"))
        args = [launcher, "worker", "--processes", str(processes)]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        return cls._spawn([args], env, log_path)

    @classmethod
    def baseline(cls, env: Mapping[str, str], log_path: Path, instances: int) -> Fleet:
        """N plain `celery worker` instances (default prefork pool, concurrency = cores)."""
        from bench.baseline_app import QUEUE

        commands = [
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.baseline_app",
                "worker",
                "-Q",
                QUEUE,
                "-n",
                f"baseline-{i}-{secrets.token_hex(3)}@%h",
                "--loglevel",
                "WARNING",
            ]
            for i in range(1, instances + 1)
        ]
        return cls._spawn(commands, env, log_path)

    @classmethod
    def _spawn(cls, commands: Iterable[list[str]], env: Mapping[str, str], log_path: Path) -> Fleet:
        fleet = cls(log_path=log_path)
        full_env = clean_environ()
        full_env.update(env)
        with log_path.open("ab") as out:
            for command in commands:
                fleet.procs.append(
                    subprocess.Popen(
                        command,
                        env=full_env,
                        cwd=REPO_ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        return fleet

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def pids(self) -> list[int]:
        """Every process of the fleet: launchers and their worker children."""
        found = []
        for proc in self.procs:
            found += [proc.pid, *_descendants(proc.pid)]
        return found

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Cold stop: the measurement is over, jobs still in hand don't matter.

        Our launcher forwards a first SIGTERM as warm and a second as cold (SIGQUIT);
        a plain celery worker takes SIGQUIT as cold. Whatever remains is SIGKILLed."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                for child in _descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGQUIT)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
        # Orphaned grandchildren (own sessions) must not outlive the scenario.
        time.sleep(0.2)


# ------------------------------------------------------------------ where the CPU goes


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one live process and of its children it has reaped (0 if
    it is gone): PostgreSQL's postmaster thus carries the backends that ended meanwhile."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def pids_named(comm: str) -> list[int]:
    """Live processes whose command name is `comm` (postgres backends, redis-server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
    return found


@dataclass
class CpuMeter:
    """CPU used by each group of processes between `start()` and `stop()`.

    Process lists are read at each end; a process that ends in between loses its share
    unless its parent is in the group and reaps it (the postmaster reaps its backends)."""

    groups: Mapping[str, Callable[[], Sequence[int]]]
    _t0: float = 0.0
    _at_start: dict[str, dict[int, float]] = field(default_factory=dict)
    used_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {pid: _cpu_s(pid) for pid in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._at_start = self._read()

    def stop(self) -> None:
        end = self._read()
        self.wall_s = time.monotonic() - self._t0
        for name, now in end.items():
            before = self._at_start.get(name, {})
            self.used_s[name] = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())


# ------------------------------------------------------------------ measurements


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100.0 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class WindowStats:
    """What the emulator counted, by 1-second window (epoch second)."""

    first_s: int  # first window with an accepted call
    start_s: int  # steady window: [start_s, end_s)
    end_s: int
    accepted: int  # in the steady window
    throttled_steady: int
    accepted_total: int  # over the whole run
    throttled_total: int
    max_window: int  # max accepted in any 1-second window of the whole run
    per_second: tuple[int, ...]  # accepted per steady second
    timeline: tuple[tuple[int, int, int], ...] = ()  # (second, accepted, throttled), whole run

    @property
    def seconds(self) -> int:
        return max(0, self.end_s - self.start_s)

    @property
    def mean_per_s(self) -> float:
        return self.accepted / self.seconds if self.seconds else float("nan")

    @property
    def throttled_fraction(self) -> float:
        calls = self.accepted_total + self.throttled_total
        return self.throttled_total / calls if calls else 0.0

    def mean_second_half(self) -> float:
        half = self.per_second[len(self.per_second) // 2 :]
        return sum(half) / len(half) if half else float("nan")


def parse_windows(windows: Mapping[str, Mapping[str, int]]) -> dict[int, tuple[int, int]]:
    """The counters' `windows` document → {second: (accepted, throttled)}."""
    return {
        int(sec): (int(c.get("accepted", 0)), int(c.get("throttled", 0)))
        for sec, c in windows.items()
    }


def first_accepted_second(windows: Mapping[int, tuple[int, int]]) -> int | None:
    seconds = [sec for sec, (acc, _) in windows.items() if acc > 0]
    return min(seconds) if seconds else None


def window_stats(windows: Mapping[int, tuple[int, int]], start_s: int, end_s: int) -> WindowStats:
    """Steady window [start_s, end_s); totals and the max window over everything counted."""
    first = first_accepted_second(windows)
    steady = [windows.get(sec, (0, 0)) for sec in range(start_s, end_s)]
    return WindowStats(
        first_s=first if first is not None else start_s,
        start_s=start_s,
        end_s=end_s,
        accepted=sum(a for a, _ in steady),
        throttled_steady=sum(t for _, t in steady),
        accepted_total=sum(a for a, _ in windows.values()),
        throttled_total=sum(t for _, t in windows.values()),
        max_window=max((a for a, _ in windows.values()), default=0),
        per_second=tuple(a for a, _ in steady),
        timeline=tuple((sec, *windows[sec]) for sec in sorted(windows)),
    )


@dataclass(frozen=True)
class SqlStats:
    """From the scenario's database: jobs stored, calls per job, enqueue-to-stored latency."""

    stored_total: int
    stored_in_window: int
    calls_per_job: float  # api_calls of the jobs stored (throttled calls included)
    latency_p50_s: float  # job.created_at -> result.created_at, jobs stored in the window
    latency_p99_s: float
    claim_p50_s: float  # job.started_at -> result.created_at (NaN when not recorded)
    claim_p99_s: float
    last_stored_s: float  # epoch of the last result (NaN when none)


def sql_stats(database_url: str, start_s: float, end_s: float) -> SqlStats:
    from models import Job, Result

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(Job.created_at, Job.started_at, Job.api_calls, Result.created_at).join(
                    Result, Result.job_id == Job.id
                )
            ).all()
    finally:
        engine.dispose()
    stored_at = [r[3].timestamp() for r in rows]
    in_window = [
        (created.timestamp(), started.timestamp() if started else None, done)
        for (created, started, _calls, _), done in zip(rows, stored_at, strict=True)
        if start_s <= done < end_s
    ]
    latencies = [done - created for created, _, done in in_window]
    claims = [done - started for _, started, done in in_window if started is not None]
    calls = [int(r[2]) for r in rows]
    return SqlStats(
        stored_total=len(rows),
        stored_in_window=len(in_window),
        calls_per_job=sum(calls) / len(calls) if calls else float("nan"),
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        claim_p50_s=percentile(claims, 50),
        claim_p99_s=percentile(claims, 99),
        last_stored_s=max(stored_at) if stored_at else float("nan"),
    )


def count_stored(database_url: str) -> int:
    from models import Result

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(Result)).scalar_one())
    finally:
        engine.dispose()
