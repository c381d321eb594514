"""`macao-ocr worker` (the real launcher): its children die with it even when it is SIGKILLed,
`--hostname` names them, and a busy metrics port does not stop it from working.

Only the pids this test's launcher reported are looked at (other developers run Celery
workers on the same machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.fixtures.workers import cli_env

pytestmark = pytest.mark.integration

MACAO_OCR = str(Path(sys.executable).parent / "macao-ocr")
START_TIMEOUT_S = 90.0
DEATH_TIMEOUT_S = 30.0


def started_pids(log: Path) -> list[int]:
    """The child pids the launcher logged (`worker_started` events)."""
    pids = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "worker_started":
                pids.append(int(event["pid"]))
    return pids


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of `pid`, None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def is_our_child(pid: int, hostname: str) -> bool:
    """The pid still runs a celery worker named for this test (pids can be reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"celery" in cmdline and hostname.encode() in cmdline


def ping_names(broker_url: str) -> set[str]:
    from celery import Celery

    app = Celery("launcher_ping", broker=broker_url, set_as_current=False)
    try:
        return {name for reply in app.control.ping(timeout=1.0) or [] for name in reply}
    finally:
        app.close()


class Launcher:
    def __init__(self, env: Mapping[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.hostname = f"ops-test-{uuid.uuid4().hex[:8]}"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [MACAO_OCR, "worker", "--concurrency", "2", "--hostname", self.hostname, *args],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_children(self, n: int, broker_url: str) -> list[int]:
        """Wait until `n` OCR children and the webhook process answer a ping under our
        hostname; all their pids."""
        deadline = time.monotonic() + START_TIMEOUT_S
        want = {f"macao-ocr-{i}@{self.hostname}" for i in range(1, n + 1)}
        want.add(f"macao-ocr-webhooks@{self.hostname}")
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"launcher exited:\n{self.log.read_text()[-3000:]}", pytrace=False)
            if want <= ping_names(broker_url):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"children not ready:\n{self.log.read_text()[-3000:]}", pytrace=False)
        pids = started_pids(self.log)
        assert len(pids) == n + 1, pids
        return pids

    def cleanup(self, pids: list[int]) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in pids:  # leftovers of a failed run: ours only
            if alive(pid) and is_our_child(pid, self.hostname):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = cli_env(worker_env)
    env["MACAO_OCR_PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    return env


@pytest.fixture
def busy_port() -> Iterator[int]:
    # The launcher binds every interface: hold the port on all of them.
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_sigkilled_launcher_takes_its_children(env: dict[str, str], tmp_path: Path) -> None:
    launcher = Launcher(env, tmp_path / "launcher.log", "--processes", "2")
    pids: list[int] = []
    try:
        pids = launcher.wait_children(2, env["MACAO_OCR_BROKER_URL"])
        for pid in pids:
            state = proc_state(pid)
            assert state is not None and state[1] == launcher.proc.pid, (pid, state)

        os.kill(launcher.proc.pid, signal.SIGKILL)  # what the OOM killer does
        launcher.proc.wait(10)

        deadline = time.monotonic() + DEATH_TIMEOUT_S
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in pids if alive(pid)] == [], "orphaned workers outlived the launcher"
        assert not any(
            launcher.hostname in name for name in ping_names(env["MACAO_OCR_BROKER_URL"])
        )
    finally:
        launcher.cleanup(pids)


def test_hostname_names_children_and_busy_metrics_port_is_one_warning(
    env: dict[str, str], tmp_path: Path, busy_port: int
) -> None:
    env["MACAO_OCR_METRICS_PORT"] = str(busy_port)
    launcher = Launcher(env, tmp_path / "launcher.log", "--processes", "1")
    pids: list[int] = []
    try:
        # Ready under its own name, although its metrics port was taken.
        pids = launcher.wait_children(1, env["MACAO_OCR_BROKER_URL"])
        lines = launcher.log.read_text().splitlines()
        named = [line for line in lines if "MACAO_OCR_METRICS_PORT" in line]
        assert len(named) == 1, named
        warning = json.loads(named[0])
        assert warning["event"] == "metrics_port_busy" and warning["level"] == "warning"
        assert not any("Traceback" in line or "Errno 98" in line for line in lines)
        assert launcher.proc.poll() is None

        # ...and it works jobs.
        from emulator.specimen import make_specimen

        card = tmp_path / "card.jpg"
        card.write_bytes(make_specimen(seed=31).image)
        done = subprocess.run(
            [MACAO_OCR, "submit", str(card)], env=env, capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()
        job_id = done.stdout.decode().strip()
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                [MACAO_OCR, "status", job_id, "--json"], env=env, capture_output=True, timeout=60
            )
            status = json.loads(out.stdout)["status"]
            if status == "succeeded":
                break
            time.sleep(0.5)
        assert status == "succeeded"
    finally:
        launcher.cleanup(pids)
