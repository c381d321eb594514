"""`macao-ocr demo`: the whole pipeline on a bare machine, then a table of what happened.

Everything it needs it starts itself and stops at the end: a SQLite file migrated with the
project's Alembic revisions, a private broker (demo.embedded_broker), the Tencent emulator
with a one-off credential pair, and a real Celery worker. Every child is configured from ONE
environment dict, so the producer (this process), the worker and the emulator agree.

With the user's own Tencent credentials (and no MACAO_OCR_API_ENDPOINT), the demo reads the
user's images through the real service instead; the emulator and generated cards stay out.

The demo lives outside `worker`: it imports `emulator` (lazily, for the specimen cards) and
fakeredis (the `[demo]` extra); worker code never imports either (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from demo.embedded_broker import EmbeddedBroker, free_port, start_broker
from worker.errors import ConfigError, InputError
from worker.privacy.crypto import generate_entry, generate_lookup_key
from worker.privacy.seal import Sealer
from worker.procs import die_with_parent
from worker.settings import ENV_PREFIX, Settings
from worker.tencent.types import WARNING_SERVICE_DISABLED

# Fields of Settings whose variable is the Tencent SDK's, not ours.
_TENCENT_FIELDS = ("secret_id", "secret_key", "session_token")
RUN_MARKER_VAR = "MACAO_OCR_DEMO_RUN"
DEMO_TENANT = "demo"
TERMINAL = frozenset({"succeeded", "failed"})

# Warning sets shown on the generated cards, cycled through.
_WARNING_SETS: tuple[tuple[str, ...], ...] = (
    (),
    ("photocopy",),
    ("glare",),
    ("screen_recapture",),
    ("covered", "blurry"),
    (),
    ("tampered",),
    ("photocopy", "glare"),
)


class DemoError(RuntimeError):
    """The demo could not run (a part failed to start, bad options): message says which."""


# ---------------------------------------------------------------------------------- the cards


@dataclass(frozen=True)
class DemoCard:
    """One input of the demo and what should become of it."""

    label: str
    source: bytes | Path = field(repr=False)
    # "succeeded", "failed" (with expect_code), "refused" (at submit), or "terminal" (either).
    expect: str
    expect_code: str | None = None
    truth: Mapping[str, Any] | None = field(default=None, repr=False)
    note: str = ""
    # The decision the default policy gives this card (None: not checked).
    expect_decision: str | None = None


def _plain_jpeg() -> bytes:
    """A valid JPEG that is not an ID card: the service answers ImageNoSpecifiedCard."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 400), (236, 229, 206))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 600, 360), outline=(90, 90, 90), width=6)
    draw.text((80, 180), "a holiday postcard, not an identity card", fill=(40, 40, 40))
    out = BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def _gif() -> bytes:
    """A GIF: the API does not take it, so the producer refuses it before any call."""
    from PIL import Image

    out = BytesIO()
    Image.new("RGB", (64, 40), (200, 30, 30)).save(out, format="GIF")
    return out.getvalue()


def specimen_cards(count: int, *, seed: int = 853) -> list[DemoCard]:
    """`count` inputs: specimen cards (some with warnings, one without expiry, one PNG), then,
    when there is room, a non-card image that fails permanently and a GIF refused at submit."""
    if count < 1:
        raise DemoError("--jobs must be at least 1")
    from emulator.specimen import make_specimen

    extras = 2 if count >= 4 else 0
    cards: list[DemoCard] = []
    today = date.today()
    for index in range(count - extras):
        warnings = _WARNING_SETS[index % len(_WARNING_SETS)]
        no_expiry = index == 3
        fmt = "PNG" if index == 5 else "JPEG"
        # Valid today, so the decision shows the warnings; one card expired three days ago.
        expired = index == len(_WARNING_SETS)
        fields = {"ValidityPeriod": (today - timedelta(days=3)).strftime("%d-%m-%Y")}
        specimen = make_specimen(
            seed + index,
            warnings=warnings,
            fmt=fmt,
            no_expiry=no_expiry,
            valid_on=today,
            fields=fields if expired else None,
        )
        notes = []
        if no_expiry:
            notes.append("no expiry")
        if fmt == "PNG":
            notes.append("PNG")
        if expired:
            notes.append("expired")
        cards.append(
            DemoCard(
                label=f"specimen-{index + 1:02d}",
                source=specimen.image,
                expect="succeeded",
                truth=specimen.truth,
                note="; ".join(notes),
                expect_decision=_default_decision(warnings, expired=expired),
            )
        )
    if extras:
        cards.append(
            DemoCard(
                label="not-a-card.jpg",
                source=_plain_jpeg(),
                expect="failed",
                expect_code="FailedOperation.ImageNoSpecifiedCard",
                note="not an ID card",
            )
        )
        cards.append(DemoCard(label="card.gif", source=_gif(), expect="refused", note="GIF"))
    return cards


def _default_decision(warnings: Sequence[str], *, expired: bool) -> str:
    """What the default policy makes of a valid specimen with these warnings."""
    from worker.reason_codes import DEFAULTS, Effect

    effects = {DEFAULTS[w] for w in warnings}
    if expired or Effect.reject in effects:
        return "reject"
    return "consider" if effects else "clear"


def user_cards(images: Sequence[Path]) -> list[DemoCard]:
    """The user's own files, read through the real service: any terminal state is fine."""
    return [DemoCard(label=path.name, source=path, expect="terminal") for path in images]


# ------------------------------------------------------------------------ one environment


@dataclass(frozen=True)
class DemoPlan:
    """How this run is wired, decided before anything starts."""

    real_service: bool
    jobs: int
    qps: float
    broker: str
    concurrency: int
    timeout_s: float
    keep: bool
    images: tuple[Path, ...] = ()


def wants_real_service(environ: Mapping[str, str]) -> bool:
    """The user's own credential and no endpoint override: read through Tencent itself."""
    has_credential = bool(environ.get("TENCENTCLOUD_SECRET_ID"))
    endpoint_set = bool(environ.get(f"{ENV_PREFIX}API_ENDPOINT"))
    return has_credential and not endpoint_set


def check_plan(plan: DemoPlan, environ: Mapping[str, str]) -> None:
    """Refuse contradictory options with a message naming what to change."""
    if plan.real_service:
        if not plan.images:
            raise DemoError(
                "TENCENTCLOUD_SECRET_ID is set, so the demo reads YOUR images through the real "
                "Tencent Cloud service: pass them as arguments (macao-ocr demo CARD.jpg ...), "
                "or use --emulator to run on generated specimen cards"
            )
        if not environ.get("TENCENTCLOUD_SECRET_KEY"):
            raise DemoError("TENCENTCLOUD_SECRET_ID is set but TENCENTCLOUD_SECRET_KEY is not")
        missing = [str(p) for p in plan.images if not p.is_file()]
        if missing:
            raise DemoError("image file not found: " + ", ".join(missing))
    elif plan.images:
        raise DemoError(
            "image arguments are read through the real service only: set "
            "TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY (and leave MACAO_OCR_API_ENDPOINT "
            "unset); without them the demo generates its own specimen cards"
        )
    if plan.qps < 0:
        raise DemoError("--qps must be 0 (no limit) or more")


def demo_environment(
    environ: Mapping[str, str],
    *,
    real_service: bool,
    database_url: str,
    broker_url: str,
    qps: float,
    concurrency: int,
    run_id: str,
    emulator_url: str | None = None,
    credential: tuple[str, str] | None = None,
) -> dict[str, str]:
    """The single environment every part of the run is configured from.

    Emulator mode drops the user's MACAO_OCR_* and TENCENTCLOUD_* variables entirely (their
    Redis, database and credentials are never touched); real-service mode keeps their API
    settings but still points storage and broker at the private ones.
    """
    env = {
        key: value
        for key, value in environ.items()
        if not (key.startswith(ENV_PREFIX) and not real_service)
        and not (key.startswith("TENCENTCLOUD_") and not real_service)
    }
    if real_service:
        env.pop(f"{ENV_PREFIX}API_ENDPOINT", None)
    env.update(
        {
            f"{ENV_PREFIX}DATABASE_URL": database_url,
            f"{ENV_PREFIX}BROKER_URL": broker_url,
            f"{ENV_PREFIX}REDIS_URL": broker_url,
            f"{ENV_PREFIX}TENANT": DEMO_TENANT,
            f"{ENV_PREFIX}QPS": repr(float(qps)),
            f"{ENV_PREFIX}WORKER_CONCURRENCY": str(concurrency),
            f"{ENV_PREFIX}WORKER_PROCESSES": "1",
            f"{ENV_PREFIX}METRICS_PORT": "0",
            f"{ENV_PREFIX}LOG_JSON": "true",
            f"{ENV_PREFIX}LOG_LEVEL": "INFO",
            # A demo should show retries, not make anyone wait minutes for them.
            f"{ENV_PREFIX}BACKOFF_BASE_S": "0.5",
            f"{ENV_PREFIX}BACKOFF_MAX_S": "5",
            f"{ENV_PREFIX}SWEEP_INTERVAL_S": "1",
            f"{ENV_PREFIX}CIRCUIT_PROBE_INTERVAL_S": "5",
            # The demo shows the URL fallback; in production it is the operator's decision.
            f"{ENV_PREFIX}URL_FALLBACK": "true",
            RUN_MARKER_VAR: run_id,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop(f"{ENV_PREFIX}PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if not real_service:
        if emulator_url is None or credential is None:
            raise DemoError("emulator mode needs the emulator URL and its credential")
        env[f"{ENV_PREFIX}API_ENDPOINT"] = emulator_url
        env["TENCENTCLOUD_SECRET_ID"], env["TENCENTCLOUD_SECRET_KEY"] = credential
    # The demo's private database gets keys of its own (made here, never printed) unless
    # the user brought theirs (real-service mode).
    if not env.get(f"{ENV_PREFIX}DATA_KEYS") and not env.get(f"{ENV_PREFIX}DATA_KEYS_FILE"):
        env[f"{ENV_PREFIX}DATA_KEYS"] = generate_entry("demo")
    if not env.get(f"{ENV_PREFIX}LOOKUP_KEY"):
        env[f"{ENV_PREFIX}LOOKUP_KEY"] = generate_lookup_key()
    return env


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """The Settings the children will build from `env`, built the same way here."""
    values: dict[str, str] = {}
    for name in Settings.model_fields:
        tencent = f"TENCENTCLOUD_{name.upper()}"
        ours = f"{ENV_PREFIX}{name.upper()}"
        if name in _TENCENT_FIELDS and tencent in env:
            values[name] = env[tencent]
        elif ours in env:
            values[name] = env[ours]
    try:
        # model_validate skips BaseSettings' own sources: this process's environment is unread.
        return Settings.model_validate(values)
    except ValidationError as exc:
        # Field names only: a value could be a secret.
        fields = ", ".join(str(err["loc"][0]) for err in exc.errors() if err["loc"])
        raise ConfigError(f"invalid demo configuration in: {fields}") from None


def new_credential() -> tuple[str, str]:
    """A throwaway SecretId/SecretKey pair shared by the emulator and the worker."""
    return "AKIDdemo" + secrets.token_hex(12), secrets.token_urlsafe(30)


# -------------------------------------------------------------------------- child processes


@dataclass
class ChildProcess:
    """A child started in its own session, logging to a file, stopped with its whole group."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the process group (warm shutdown), SIGKILL whatever is left."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        # The group may outlive its leader (a celery child): make sure nothing remains.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


def spawn(name: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path) -> ChildProcess:
    """Start `args` with `env`, output to `<log_dir>/<name>.log`."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    return ChildProcess(name=name, process=process, log_path=log_path)


def emulator_args(port: int, qps: float) -> list[str]:
    """The emulator on loopback; its quota equals the demo's QPS so a throttle would show."""
    args = [sys.executable, "-m", "emulator", "--port", str(port), "--host", "127.0.0.1"]
    # A little realistic latency, so the progress bar has something to show.
    args += ["--latency-median-ms", "80", "--latency-sigma", "0.4"]
    if qps > 0:
        # The emulator counts whole calls per window; a fractional rate fits under its ceiling.
        args += ["--quota-per-s", str(math.ceil(qps))]
    return args


def worker_args(concurrency: int) -> list[str]:
    """One real Celery worker process with the threads pool, consuming the project's queue."""
    from worker.broker.publish import QUEUE

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-Q",
        QUEUE,
        "-n",
        f"macao-ocr-demo-{os.getpid()}@%h",
        # No peers to meet: skip the broadcast chatter and start faster.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "INFO",
    ]


def wait_for_http(url: str, child: ChildProcess, timeout_s: float = 20.0) -> None:
    """Poll `url` until it answers (any HTTP status), or fail naming the child and its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.running():
            raise DemoError(f"the {child.name} exited at start:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own loopback URL
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"the {child.name} did not answer at {url} within {timeout_s:.0f}s")


# --------------------------------------------------------------------------------- the run


@dataclass
class DemoRow:
    """What became of one card."""

    card: DemoCard
    job_id: uuid.UUID | None = None
    status: str = "refused"
    view: dict[str, Any] | None = field(default=None, repr=False)
    refusal: str | None = None
    problem: str | None = None  # set when the outcome differs from the expectation

    @property
    def as_expected(self) -> bool:
        return self.problem is None


@dataclass
class DemoReport:
    """The run's outcome, for the table and the exit code."""

    real_service: bool
    broker_kind: str
    rows: list[DemoRow]
    elapsed_s: float
    timed_out: bool = False
    database_path: Path | None = None
    workdir: Path | None = None
    worker_log_tail: str = ""

    def counts(self) -> Counter[str]:
        return Counter(row.status for row in self.rows)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(row.as_expected for row in self.rows)


def check_outcome(row: DemoRow) -> str | None:
    """Compare a finished row with its card's expectation; None when they agree."""
    card, view = row.card, row.view or {}
    if card.expect == "refused":
        return None if row.status == "refused" else f"expected a refusal, got {row.status}"
    if row.status == "refused":
        return f"refused at submit: {row.refusal}"
    if card.expect == "terminal":
        return None if row.status in TERMINAL else f"still {row.status}"
    if row.status != card.expect:
        return f"expected {card.expect}, got {row.status} ({view.get('error_code')})"
    if card.expect == "failed":
        code = view.get("error_code")
        return None if code == card.expect_code else f"expected {card.expect_code}, got {code}"
    truth = card.truth or {}
    result = view.get("result") or {}
    if result.get("id_number") != truth.get("ID"):
        return "ID number differs from the card's"
    if result.get("en_last_name") != truth.get("EnLastName"):
        return "name differs from the card's"
    codes = truth.get("WarnCardInfos", [])
    want = sorted(int(c) for c in codes if int(c) != WARNING_SERVICE_DISABLED)
    got = sorted(int(w["code"]) for w in view.get("warnings", []))
    if got != want:
        return f"warnings {got} differ from the card's {want}"
    decision = view.get("decision")
    if card.expect_decision is not None and decision != card.expect_decision:
        return f"decision {decision}, expected {card.expect_decision}"
    return None


ProgressFn = Callable[[int, int, Mapping[str, int]], None]
EventFn = Callable[[str], None]


@dataclass
class _Parts:
    workdir: Path
    env: dict[str, str]
    settings: Settings
    broker: EmbeddedBroker
    children: list[ChildProcess] = field(default_factory=list)


def _workdir(stack: contextlib.ExitStack, keep: bool) -> Path:
    if keep:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = Path.cwd() / ".macao-ocr" / f"demo-{stamp}-{secrets.token_hex(2)}"
        path.mkdir(parents=True)
        return path
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="macao-ocr-demo-")))


def _start(
    stack: contextlib.ExitStack, plan: DemoPlan, environ: Mapping[str, str], event: EventFn
) -> _Parts:
    workdir = _workdir(stack, plan.keep)
    database_path = workdir / "demo.db"
    run_id = uuid.uuid4().hex[:12]
    marker_env = {**environ, RUN_MARKER_VAR: run_id}

    broker = start_broker(plan.broker, env=marker_env)
    stack.callback(broker.stop)
    event(f"broker: {broker.kind} at {broker.url} (private, stopped at the end)")

    emulator_url = credential = None
    emulator: ChildProcess | None = None
    if not plan.real_service:
        port = free_port()
        emulator_url = f"http://127.0.0.1:{port}"
        credential = new_credential()
    env = demo_environment(
        environ,
        real_service=plan.real_service,
        database_url=f"sqlite:///{database_path}",
        broker_url=broker.url,
        qps=plan.qps,
        concurrency=plan.concurrency,
        run_id=run_id,
        emulator_url=emulator_url,
        credential=credential,
    )
    settings = settings_from_env(env)
    parts = _Parts(workdir=workdir, env=env, settings=settings, broker=broker)

    if emulator_url is not None:
        emulator = spawn("emulator", emulator_args(port, plan.qps), env, workdir)
        stack.callback(emulator.stop)
        parts.children.append(emulator)

    import migrations

    migrations.upgrade(settings.database_url)
    event(f"database: SQLite {database_path} (migrated)")

    worker = spawn("worker", worker_args(plan.concurrency), env, workdir)
    # Registered last, so it stops first: the worker finishes before the broker goes away.
    stack.callback(worker.stop)
    parts.children.append(worker)

    if emulator is not None and emulator_url is not None:
        wait_for_http(f"{emulator_url}/__emulator__/health", emulator)
        event(f"emulator: {emulator_url} (a one-off demo credential on both sides)")
    else:
        event(f"API: {settings.api_endpoint} (the REAL Tencent Cloud service, your quota)")
    event(f"worker: celery, threads pool x{plan.concurrency}, {_qps_text(plan.qps)}")
    return parts


def _qps_text(qps: float) -> str:
    return "no rate limit" if qps == 0 else f"shared limit {qps:g} calls/s"


def _submit(parts: _Parts, cards: Sequence[DemoCard], batch: str) -> list[DemoRow]:
    from worker.app import create_app
    from worker.broker.publish import CeleryPublisher
    from worker.producer import submit
    from worker.store.engine import make_engine, make_sessionmaker

    engine = make_engine(parts.settings)
    session_factory = make_sessionmaker(engine)
    app = create_app(parts.settings)
    publisher = CeleryPublisher(app)
    sealer = Sealer.from_settings(parts.settings)
    rows: list[DemoRow] = []
    try:
        for card in cards:
            row = DemoRow(card=card)
            try:
                row.job_id = submit(
                    session_factory, publisher, parts.settings, card.source,
                    tag=card.label, batch=batch, sealer=sealer,
                )  # fmt: skip
                row.status = "queued"
            except InputError as exc:
                row.refusal = str(exc)
            rows.append(row)
    finally:
        with contextlib.suppress(Exception):
            app.close()
        engine.dispose()
    return rows


def _poll(
    parts: _Parts, rows: list[DemoRow], timeout_s: float, progress: ProgressFn | None
) -> bool:
    """Wait until every submitted job is terminal; refresh statuses; False on timeout."""
    from sqlalchemy import select

    from models import Job
    from worker.store.engine import make_engine, make_sessionmaker
    from worker.store.views import job_view

    by_id = {row.job_id: row for row in rows if row.job_id is not None}
    worker = parts.children[-1]
    engine = make_engine(parts.settings)
    session_factory = make_sessionmaker(engine)
    sealer = Sealer.from_settings(parts.settings)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with session_factory() as session:
                jobs = session.scalars(select(Job).where(Job.id.in_(list(by_id)))).all()
                for job in jobs:
                    row = by_id[job.id]
                    row.status = str(job.status)
                    if row.status in TERMINAL and row.view is None:
                        row.view = job_view(session, job, sealer=sealer)
            done = sum(1 for row in by_id.values() if row.status in TERMINAL)
            if progress is not None:
                progress(done, len(by_id), Counter(row.status for row in by_id.values()))
            if done == len(by_id):
                return True
            if not worker.running():
                raise DemoError(f"the worker stopped unexpectedly:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
    finally:
        engine.dispose()


def run_demo(
    plan: DemoPlan,
    environ: Mapping[str, str],
    *,
    event: EventFn = lambda _msg: None,
    progress: ProgressFn | None = None,
) -> DemoReport:
    """Start everything, submit the cards, wait for them, stop everything, report."""
    check_plan(plan, environ)
    started = time.monotonic()
    cards = user_cards(plan.images) if plan.real_service else specimen_cards(plan.jobs)
    with contextlib.ExitStack() as stack:
        parts = _start(stack, plan, environ, event)
        batch = f"demo-{parts.env[RUN_MARKER_VAR]}"
        rows = _submit(parts, cards, batch)
        refused = sum(1 for row in rows if row.status == "refused")
        event(f"submitted {len(rows) - refused} job(s) as batch {batch}, refused {refused}")
        finished = _poll(parts, rows, plan.timeout_s, progress)
        for row in rows:
            if row.status == "refused" or row.status in TERMINAL:
                row.problem = check_outcome(row)
            else:
                row.problem = f"still {row.status} after {plan.timeout_s:.0f}s"
        report = DemoReport(
            real_service=plan.real_service,
            broker_kind=parts.broker.kind,
            rows=rows,
            elapsed_s=time.monotonic() - started,
            timed_out=not finished,
            database_path=(parts.workdir / "demo.db") if plan.keep else None,
            workdir=parts.workdir if plan.keep else None,
        )
        if not report.ok:
            report.worker_log_tail = parts.children[-1].log_tail()
    return report


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every child is still stopped in order."""

    def _raise(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
