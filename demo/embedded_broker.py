"""A throwaway Redis for the demo: a private `redis-server`, or fakeredis's TCP server.

The demo must run on a machine with no server configured and must never touch the user's own
Redis, so it always starts its own on a free loopback port and stops it at the end. A real
`redis-server` is preferred (it is what production runs); fakeredis is the fallback and needs
`lupa` so that EVAL works for the shared rate limiter's Lua script.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis

from worker.procs import die_with_parent

BROKER_KINDS: tuple[str, ...] = ("auto", "redis-server", "fakeredis")
_START_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


class EmbeddedBroker(Protocol):
    """A running private Redis."""

    @property
    def url(self) -> str: ...

    @property
    def kind(self) -> str: ...

    def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_ping(url: str, timeout_s: float = _START_TIMEOUT_S) -> None:
    """Block until the Redis at `url` answers PING, or raise BrokerError."""
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the embedded broker at {url} did not answer within {timeout_s}s"
                )
            time.sleep(0.05)
    finally:
        client.close()


@dataclass
class RedisServerBroker:
    """A `redis-server` child process that keeps nothing on disk."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: tempfile.TemporaryDirectory[str]
    kind: str = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and remove its working folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.workdir.cleanup()


def start_redis_server(
    executable: str, *, attempts: int = 3, env: Mapping[str, str] | None = None
) -> RedisServerBroker:
    """Start `redis-server` on a free loopback port with persistence switched off.

    It runs in its own session so a Ctrl-C at the terminal reaches only the demo, which then
    stops its children in order (worker first, broker last).
    """
    last_problem = "not started"
    for _ in range(attempts):
        port = free_port()
        workdir = tempfile.TemporaryDirectory(prefix="macao-ocr-redis-")
        args = [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir.name,
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        log_path = Path(workdir.name) / "redis.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        broker = RedisServerBroker(process=process, port=port, workdir=workdir)
        try:
            _wait_for_child(broker)
        except BrokerError as exc:
            # Most likely another program took the port between our probe and the bind.
            last_problem = str(exc)
            broker.stop()
            continue
        return broker
    raise BrokerError(f"could not start redis-server: {last_problem}")


def _wait_for_child(broker: RedisServerBroker) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            log_path = Path(broker.workdir.name) / "redis.log"
            err = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise BrokerError(f"redis-server exited with {broker.process.returncode}: {err[-300:]}")
        try:
            wait_for_ping(broker.url, timeout_s=0.3)
            return
        except BrokerError:
            continue
    raise BrokerError(f"redis-server on port {broker.port} did not answer")


@dataclass
class FakeRedisBroker:
    """fakeredis's TCP server, served from a thread of this process."""

    server: object
    thread: threading.Thread
    port: int
    kind: str = "fakeredis"
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop serving, close the listening socket and join the serving thread."""
        if self._stopped:
            return
        self._stopped = True
        server = self.server
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
        self.thread.join(timeout=5)


def lua_available() -> bool:
    """fakeredis answers EVAL only when `lupa` is importable."""
    return importlib.util.find_spec("lupa") is not None


def _fakeredis_server() -> Any:
    """fakeredis's TcpFakeServer whose connections survive an error reply.

    Its stock handler closes the connection after ANY error reply. redis-py's Script runs
    EVALSHA first and falls back to EVAL on NOSCRIPT over the same connection, so with the stock
    handler every first call of the limiter's script fails with "connection closed". Here the
    error goes back to the client as a normal RESP error and the connection stays open, as a
    real Redis does. Transport failures still end the connection.
    """
    from fakeredis import TcpFakeServer
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler

    class ErrorReplyHandler(TCPFakeRequestHandler):
        def setup(self) -> None:
            super().setup()
            client = self.current_client
            read_response = client.read_response

            def read_or_error(**kwargs: Any) -> Any:
                try:
                    return read_response(**kwargs)
                except redis.ResponseError as exc:
                    return exc  # encoded as "-<PREFIX> message" by the handler

            client.read_response = read_or_error  # type: ignore[method-assign]

    server = TcpFakeServer(("127.0.0.1", 0), server_version=(7, 0))
    server.RequestHandlerClass = ErrorReplyHandler
    return server


def start_fakeredis() -> FakeRedisBroker:
    """Serve an in-memory fakeredis over TCP on a free loopback port."""
    if importlib.util.find_spec("fakeredis") is None or not lua_available():
        raise BrokerError(
            "the embedded broker needs fakeredis and lupa (Lua for the rate limiter's script), "
            "the demo's extras: pip install 'macao-ocr[demo]', or install redis-server"
        )
    server = _fakeredis_server()
    port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fakeredis", daemon=True
    )
    thread.start()
    broker = FakeRedisBroker(server=server, thread=thread, port=port)
    try:
        wait_for_ping(broker.url)
    except BrokerError:
        broker.stop()
        raise
    return broker


def start_broker(kind: str = "auto", *, env: Mapping[str, str] | None = None) -> EmbeddedBroker:
    """Start the requested broker; "auto" prefers a `redis-server` found on PATH."""
    if kind not in BROKER_KINDS:
        raise BrokerError(f"unknown broker kind {kind!r}: choose one of {', '.join(BROKER_KINDS)}")
    executable = shutil.which("redis-server")
    if kind == "redis-server" and executable is None:
        raise BrokerError("--broker redis-server: no redis-server on PATH")
    if kind in ("auto", "redis-server") and executable is not None:
        return start_redis_server(executable, env=env)
    return start_fakeredis()


@contextlib.contextmanager
def embedded_broker(
    kind: str = "auto", *, env: Mapping[str, str] | None = None
) -> Iterator[EmbeddedBroker]:
    """The broker for the duration of a `with` block, stopped whatever happens."""
    broker = start_broker(kind, env=env)
    try:
        yield broker
    finally:
        broker.stop()
