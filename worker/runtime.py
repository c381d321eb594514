"""The per-process runtime: ONE event loop thread owning ONE aiohttp session, the OCR client,
the async Redis client, the shared limiter and the account circuit; plus the SQL engine.

Celery runs tasks in a threads pool; each task thread does its SQL synchronously and hands
the awaitable steps to the loop (`LoopThread.run`). So hundreds of calls are in flight per
process on one loop and one connection pool, and a slow call holds only a cheap waiting
thread, never a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis
import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.decision.store import PolicyCache, engine_loader
from worker.membudget import ByteBudget, return_large_buffers_to_os
from worker.netpolicy import UrlPolicy
from worker.pipeline import PipelineDeps
from worker.privacy.seal import Sealer
from worker.quota.admission import Admission
from worker.quota.circuit import AccountCircuit
from worker.quota.limiter import RateLimiter, limiter_key
from worker.settings import Settings
from worker.store.engine import make_autocommit_engine, make_engine, make_sessionmaker
from worker.tencent.client import ClientConfig, OcrClient, make_session
from worker.tencent.validation import validate_request

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Each transaction is short and never spans an API call, so a small pool serves many threads.
# No overflow: an overflow connection is closed as soon as it is returned, and under a busy
# threads pool that meant a new PostgreSQL backend (fork, authentication, catalog caches)
# every few jobs: 714 sessions for 6000 jobs in bench.quota's no-quota run. Threads wait
# for one of these instead (pool_timeout below).
# Most of the pipeline's SQL is one statement per unit, on a pool of its own (see
# `make_autocommit_engine`); transactions (retries, failures, rare starts, the sweeper) take
# the other, smaller one.
DB_POOL_SIZE = 10
DB_TRANSACTION_POOL_SIZE = 4
DB_MAX_OVERFLOW = 0


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str = "macao-ocr-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T], /, timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result in the calling thread."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from the loop's own thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            future.cancel()
            raise

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it, close it."""
        if self.loop.is_closed():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(FutureTimeout, RuntimeError):
                self.run(_cancel_all(), timeout_s=timeout_s)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


def admission_for(settings: Settings) -> Admission | None:
    """The process's admission to the quota wait: half the in-process wait's worth of its
    share of the quota, so an admitted job's turn is well within `max_quota_wait_s` (no
    deferral); None without a quota."""
    if settings.qps <= 0:
        return None
    return Admission(qps=settings.qps, window_s=settings.max_quota_wait_s / 2)


@dataclass
class _AsyncParts:
    http: aiohttp.ClientSession
    redis: aioredis.Redis
    limiter: RateLimiter
    circuit: AccountCircuit


async def _open_async(settings: Settings) -> _AsyncParts:
    """Built inside the loop: aiohttp sessions and asyncio Redis clients bind to it."""
    from worker.quota.circuit_redis import RedisAccountCircuit
    from worker.quota.horizon import HorizonLimiter
    from worker.quota.limiter_redis import RedisRateLimiter
    from worker.quota.state import state_redis

    http = make_session(settings)
    # Short timeouts (fail closed fast); the default key prefix is what `status` reads.
    client = state_redis(settings.state_redis_url)
    limiter: RateLimiter = RedisRateLimiter.from_settings(settings, client)
    if settings.qps > 0:
        limiter = HorizonLimiter(limiter, horizon_s=settings.quota_horizon_s)
    circuit = RedisAccountCircuit(client)
    return _AsyncParts(http=http, redis=client, limiter=limiter, circuit=circuit)


async def _close_async(parts: _AsyncParts) -> None:
    await parts.http.close()
    await parts.redis.aclose()


@dataclass
class WorkerRuntime:
    """What one worker process shares between its task threads."""

    settings: Settings
    loop: LoopThread
    engine: Engine
    # PostgreSQL only: the pool for one-statement units (`make_autocommit_engine`).
    autocommit_engine: Engine | None
    session_factory: sessionmaker[Session]
    client: OcrClient
    limiter: RateLimiter
    circuit: AccountCircuit
    limiter_key: str
    _parts: _AsyncParts
    # Tenants' warning policies, read from SQL at most once per 30 s (worker.decision.store).
    policies: PolicyCache
    # Seals and opens personal data (worker.privacy.seal): built once, from the key ring.
    sealer: Sealer
    # One per process: every task thread's images count against it.
    memory: ByteBudget | None = None
    # One per process: the jobs its share of the quota can serve soon (None without a quota).
    admission: Admission | None = None
    # One PipelineDeps per worker host name, built on first use: building it per task
    # seeded a fresh random.Random from os.urandom every time.
    _deps: dict[str, PipelineDeps] = field(default_factory=dict)

    @classmethod
    def start(cls, settings: Settings) -> WorkerRuntime:
        """Build everything; ConfigError (credentials, endpoint) before anything starts."""
        config = ClientConfig.from_settings(settings)
        sealer = Sealer.from_settings(settings)
        # Image buffers freed must leave the process, or the memory bound only bounds use.
        return_large_buffers_to_os()
        pool: dict[str, Any] = {
            "max_overflow": DB_MAX_OVERFLOW,
            # Wait for a connection rather than fail: threads outnumber connections.
            "pool_timeout": 60,
            # No ping per checkout (a round trip per transaction, 10% of a busy worker's
            # samples): a connection that died with the server fails its statement as
            # invalidated, and the pipeline's retry_for takes a fresh one.
            "pool_pre_ping": False,
        }
        autocommit = make_autocommit_engine(settings, pool_size=DB_POOL_SIZE, **pool)
        engine = make_engine(
            settings,
            pool_size=DB_POOL_SIZE if autocommit is None else DB_TRANSACTION_POOL_SIZE,
            **pool,
        )
        loop = LoopThread()
        try:
            parts = loop.run(_open_async(settings))
        except BaseException:
            loop.stop()
            engine.dispose()
            if autocommit is not None:
                autocommit.dispose()
            raise
        key = limiter_key(config.secret_id, config.action, config.endpoint)
        log.info(
            "runtime_started",
            concurrency=settings.worker_concurrency,
            qps=settings.qps,
            endpoint=config.endpoint,
        )
        return cls(
            settings=settings,
            loop=loop,
            engine=engine,
            autocommit_engine=autocommit,
            session_factory=make_sessionmaker(engine),
            client=OcrClient(parts.http, config),
            limiter=parts.limiter,
            circuit=parts.circuit,
            limiter_key=key,
            _parts=parts,
            policies=PolicyCache(engine_loader(engine.connect), settings.warning_policy_overrides),
            memory=ByteBudget(settings.max_inflight_bytes),
            admission=admission_for(settings),
            sealer=sealer,
        )

    def deps(self, worker_host: str | None = None) -> PipelineDeps:
        """The pipeline's dependencies for a task (shared by the process's task threads)."""
        host = worker_host or socket.gethostname()
        deps = self._deps.get(host)
        if deps is None:
            deps = PipelineDeps(
                settings=self.settings,
                transaction=self.engine.begin,
                statement=None if self.autocommit_engine is None else self.autocommit_engine.begin,
                client=self.client,
                limiter=self.limiter,
                circuit=self.circuit,
                limiter_key=self.limiter_key,
                run=self.loop.run,
                sealer=self.sealer,
                worker_host=host,
                policies=self.policies,
                memory=self.memory,
                admission=self.admission,
                validate=partial(
                    validate_request,
                    policy=UrlPolicy(allow_loopback=self.settings.url_allow_loopback),
                ),
            )
            # Two threads may both build one: setdefault keeps the first, either would do.
            deps = self._deps.setdefault(host, deps)
        return deps

    def close(self) -> None:
        """Close the HTTP session and Redis client on their loop, then the loop and engine."""
        if self.loop.alive:
            try:
                self.loop.run(_close_async(self._parts), timeout_s=10.0)
            except Exception as err:
                log.warning("runtime_close_failed", error_type=type(err).__name__)
        self.loop.stop()
        self.engine.dispose()
        if self.autocommit_engine is not None:
            self.autocommit_engine.dispose()
        log.info("runtime_closed")


_lock = threading.Lock()
_runtime: WorkerRuntime | None = None


def get_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime, started on first use (the first task or worker_ready)."""
    global _runtime
    current = _runtime
    if current is not None:
        return current
    with _lock:
        if _runtime is None:
            _runtime = WorkerRuntime.start(settings)
        return _runtime


def stop_admitting() -> None:
    """The worker is shutting down: jobs waiting for admission to the quota wait go in at
    once (and are deferred, not held), so the pool's threads end without waiting for the
    quota. Nothing to do before the runtime is built."""
    current = _runtime
    if current is not None and current.admission is not None:
        current.admission.open_all()


def shutdown_runtime() -> None:
    """Close this process's runtime if one was started (worker shutdown)."""
    global _runtime
    with _lock:
        current, _runtime = _runtime, None
    if current is not None:
        current.close()
