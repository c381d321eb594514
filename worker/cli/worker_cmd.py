"""`macao-ocr worker`: N Celery worker processes (one per core), each a threads pool of C,
plus one process for webhook deliveries (their own queue: a slow receiver never holds a
thread an OCR job could use).

Each child is `celery -A worker worker -P threads -c C -Q macao-ocr -n macao-ocr-<i>@<host>`:
inside it one event loop carries hundreds of calls (worker/runtime.py). The launcher first
checks the database (reachable, at the migrations' head), Redis and the credentials, then
supervises the children (restarts one that dies), forwards SIGTERM/SIGINT once for a warm
shutdown (a second signal asks for a cold one), and serves the fleet's aggregated metrics.
Children get SIGTERM when the launcher dies, however it dies (worker.procs).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import structlog
import typer

from worker.broker.publish import QUEUE, WEBHOOK_QUEUE
from worker.errors import ConfigError, DeploymentError
from worker.procs import die_with_parent
from worker.settings import Settings, env_name, load_settings

if TYPE_CHECKING:
    from worker.metrics import MetricsServer

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF_MAX_S = 30.0
POLL_S = 0.5


def worker_command(index: int, concurrency: int, loglevel: str, hostname: str) -> list[str]:
    """The command line of child `index` (1-based) on `hostname`."""
    return [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "-P", "threads",
        "-c", str(concurrency),
        "-Q", QUEUE,
        "-n", node_name(index, hostname),
        "--loglevel", loglevel,
        # Nodes need no startup sync or gossip: the database coordinates jobs.
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def node_name(index: int, hostname: str) -> str:
    """Celery's node name of child `index`: unique per launcher when hostnames differ."""
    return f"macao-ocr-{index}@{hostname}"


def webhook_command(concurrency: int, loglevel: str, hostname: str) -> list[str]:
    """The command line of the webhook delivery process."""
    return [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "-P", "threads",
        "-c", str(concurrency),
        "-Q", WEBHOOK_QUEUE,
        "-n", f"macao-ocr-webhooks@{hostname}",
        "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


@dataclass
class _Child:
    index: int
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0


@dataclass
class Supervisor:
    """Starts the children, restarts the ones that die, stops them all on a signal."""

    commands: list[list[str]]
    env: dict[str, str]
    metrics_dir: str | None = None
    children: list[_Child] = field(default_factory=list)
    stopping: int = 0
    alive_count: int = 0

    def start(self) -> None:
        self.children = [_Child(i + 1, cmd) for i, cmd in enumerate(self.commands)]
        for child in self.children:
            self._spawn(child)
        self.alive_count = len(self.children)

    def _spawn(self, child: _Child) -> None:
        # Own session: a terminal's Ctrl-C reaches only us, and we forward it exactly once
        # (Celery reads a second SIGINT as "cold shutdown now"). The parent-death signal
        # stops the child (warm shutdown) when we die without forwarding anything (SIGKILL,
        # the OOM killer): a worker without its supervisor must not keep taking jobs.
        child.proc = subprocess.Popen(
            child.command,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.info("worker_started", index=child.index, pid=child.proc.pid)

    def alive(self) -> int:
        """Children running at the last supervision step (read from the metrics thread,
        which must not poll, i.e. reap, the children itself)."""
        return self.alive_count

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping += 1
        # First signal: warm shutdown (finish running jobs). Again: cold (SIGQUIT).
        forward = signal.SIGTERM if self.stopping == 1 else signal.SIGQUIT
        log.info("worker_stopping", signal=signal.Signals(signum).name, forward=forward.name)
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(forward)

    def poll(self) -> bool:
        """One supervision step; False once everything has stopped after a signal."""
        now = time.monotonic()
        alive = 0
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is None:
                alive += 1
                continue
            if self.stopping:
                continue
            if proc is not None:
                self._reap(child, proc)
            if now >= child.next_start:
                self._spawn(child)
                alive += 1
        self.alive_count = alive
        return not (self.stopping and alive == 0)

    def _reap(self, child: _Child, proc: subprocess.Popen[bytes]) -> None:
        log.error("worker_exited", index=child.index, pid=proc.pid, returncode=proc.returncode)
        if self.metrics_dir is not None:
            from worker.metrics import mark_process_dead

            mark_process_dead(proc.pid, self.metrics_dir)
        child.proc = None
        child.restarts += 1
        child.next_start = time.monotonic() + min(RESTART_BACKOFF_MAX_S, 2.0**child.restarts)

    def run(self) -> int:
        self.start()
        while self.poll():
            time.sleep(POLL_S)
        return 0


def _child_env(settings: Settings, concurrency: int, metrics_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    # The runtime sizes itself from this; keep it equal to the pool's -c.
    env["MACAO_OCR_WORKER_CONCURRENCY"] = str(concurrency)
    if metrics_dir is not None:
        # Must be set before a child imports prometheus_client.
        env[MULTIPROC_ENV] = metrics_dir
    # Only the launcher serves /metrics (the aggregate); children must not bind its port.
    env["MACAO_OCR_METRICS_PORT"] = "0"
    return env


def startup_checks(settings: Settings) -> None:
    """The database (reachable, at head), Redis and the credentials; else an error naming
    each part that is wrong and what to run (ConfigError when credentials are missing)."""
    from worker.checks import run_checks

    failed = [check for check in run_checks(settings, credentials=True) if not check.ok]
    message = "; ".join(check.line() for check in failed)
    # Missing credentials are a configuration error (exit 2); services failing, exit 1.
    if any(check.name == "credentials" for check in failed):
        raise ConfigError(message)
    if failed:
        raise DeploymentError(message, code="startup_check_failed")


def _serve_metrics(settings: Settings, supervisor: Supervisor) -> MetricsServer | None:
    from worker.metrics import serve_metrics

    try:
        return serve_metrics(settings, alive=supervisor.alive)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # Jobs matter more than this launcher's endpoint: work on, say it once.
        log.warning(
            "metrics_port_busy",
            port=settings.metrics_port,
            detail=f"port in use: running without a metrics endpoint; set "
            f"{env_name('metrics_port')} to a free port (or 0 for none)",
        )
        return None


def run_workers(
    settings: Settings,
    *,
    processes: int,
    concurrency: int,
    loglevel: str,
    hostname: str | None = None,
) -> int:
    """Check the deployment, then start and supervise the worker processes until a signal."""
    from worker.privacy.seal import Sealer

    # Workers store personal data: no keys, no start (one line naming the variables).
    Sealer.from_settings(settings)
    startup_checks(settings)
    from worker.tencent.client import ClientConfig

    ClientConfig.from_settings(settings)  # the rest of the client's settings, checked once
    host = hostname or socket.gethostname()
    metrics_dir: str | None = None
    made_metrics_dir = False
    if settings.metrics_port != 0:
        from worker.metrics import multiproc_dir, prepare_multiproc_dir

        made_metrics_dir = multiproc_dir(settings) is None
        metrics_dir = prepare_multiproc_dir(settings)
        # The aggregate is read from here by this process's collector, too.
        os.environ[MULTIPROC_ENV] = metrics_dir
    commands = [worker_command(i, concurrency, loglevel, host) for i in range(1, processes + 1)]
    commands.append(webhook_command(settings.webhook_concurrency, loglevel, host))
    supervisor = Supervisor(
        commands=commands,
        env=_child_env(settings, concurrency, metrics_dir),
        metrics_dir=metrics_dir,
    )
    server = _serve_metrics(settings, supervisor) if metrics_dir is not None else None
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        return supervisor.run()
    finally:
        if server is not None:
            server.close()
        if made_metrics_dir and metrics_dir is not None:
            from worker.metrics import remove_multiproc_dir

            remove_multiproc_dir(metrics_dir)


def register(app: typer.Typer) -> None:
    """Add `macao-ocr worker`."""

    @app.command("worker")
    def worker(
        processes: Annotated[
            int | None,
            typer.Option(
                "--processes",
                "-p",
                min=1,
                help="OS processes (default MACAO_OCR_WORKER_PROCESSES; one per core).",
            ),
        ] = None,
        concurrency: Annotated[
            int | None,
            typer.Option(
                "--concurrency",
                "-c",
                min=1,
                help="Jobs in flight per process (default MACAO_OCR_WORKER_CONCURRENCY).",
            ),
        ] = None,
        loglevel: Annotated[
            str | None,
            typer.Option("--loglevel", "-l", help="Log level (default MACAO_OCR_LOG_LEVEL)."),
        ] = None,
        hostname: Annotated[
            str | None,
            typer.Option(
                "--hostname",
                help="Host part of the workers' names, macao-ocr-<i>@HOSTNAME (default: this "
                "host's name). Give each launcher on one host its own.",
            ),
        ] = None,
    ) -> None:
        """Check the deployment, then run the Celery workers that read the queued cards."""
        settings = load_settings()
        from worker.logs import configure_logging

        configure_logging(settings, level=loglevel)
        code = run_workers(
            settings,
            processes=processes or settings.worker_processes,
            concurrency=concurrency or settings.worker_concurrency,
            loglevel=(loglevel or settings.log_level).upper(),
            hostname=hostname,
        )
        raise typer.Exit(code)
