"""`macao-ocr worker`: N Celery worker processes (one per core), each a threads pool of C,
plus one process for webhook deliveries (their own queue: a slow receiver never holds a
thread an OCR job could use).

Each child is `celery -A worker worker -P threads -c C -Q macao-ocr -n macao-ocr-<i>@%h`:
inside it one event loop carries hundreds of calls (worker/runtime.py). The launcher
supervises the children (restarts one that dies), forwards SIGTERM/SIGINT once for a warm
shutdown (a second signal asks for a cold one), and serves the fleet's aggregated metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Annotated

import structlog
import typer

from worker.broker.publish import QUEUE, WEBHOOK_QUEUE
from worker.errors import ConfigError
from worker.settings import Settings, load_settings

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF_MAX_S = 30.0
POLL_S = 0.5


def worker_command(index: int, concurrency: int, loglevel: str) -> list[str]:
    """The command line of child `index` (1-based)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "-P", "threads",
        "-c", str(concurrency),
        "-Q", QUEUE,
        "-n", f"macao-ocr-{index}@%h",
        "--loglevel", loglevel,
        # Nodes need no startup sync or gossip: the database coordinates jobs.
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def webhook_command(concurrency: int, loglevel: str) -> list[str]:
    """The command line of the webhook delivery process."""
    return [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "-P", "threads",
        "-c", str(concurrency),
        "-Q", WEBHOOK_QUEUE,
        "-n", "macao-ocr-webhooks@%h",
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

    def start(self) -> None:
        self.children = [_Child(i + 1, cmd) for i, cmd in enumerate(self.commands)]
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        # Own session: a terminal's Ctrl-C reaches only us, and we forward it exactly once
        # (Celery reads a second SIGINT as "cold shutdown now").
        child.proc = subprocess.Popen(child.command, env=self.env, start_new_session=True)
        log.info("worker_started", index=child.index, pid=child.proc.pid)

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


def run_workers(settings: Settings, *, processes: int, concurrency: int, loglevel: str) -> int:
    """Start and supervise the worker processes until a signal stops them."""
    from worker.tencent.client import ClientConfig

    ClientConfig.from_settings(settings)  # no workers at all beats workers that cannot call
    metrics_dir: str | None = None
    made_metrics_dir = False
    server = None
    if settings.metrics_port != 0:
        from worker.metrics import multiproc_dir, prepare_multiproc_dir, serve_metrics

        made_metrics_dir = multiproc_dir(settings) is None
        metrics_dir = prepare_multiproc_dir(settings)
        # The aggregate is read from here by this process's collector, too.
        os.environ[MULTIPROC_ENV] = metrics_dir
        server = serve_metrics(settings)
    commands = [worker_command(i, concurrency, loglevel) for i in range(1, processes + 1)]
    commands.append(webhook_command(settings.webhook_concurrency, loglevel))
    supervisor = Supervisor(
        commands=commands,
        env=_child_env(settings, concurrency, metrics_dir),
        metrics_dir=metrics_dir,
    )
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
    ) -> None:
        """Run the Celery workers that read the queued cards."""
        try:
            settings = load_settings()
            from worker.logs import configure_logging

            configure_logging(settings, level=loglevel)
            code = run_workers(
                settings,
                processes=processes or settings.worker_processes,
                concurrency=concurrency or settings.worker_concurrency,
                loglevel=(loglevel or settings.log_level).upper(),
            )
        except ConfigError as err:
            typer.echo(f"error: {err.message}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)
