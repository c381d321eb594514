"""One contract for both account-circuit backends: the in-memory twin (fake clock) and the
Redis circuit (REAL Redis through `clean_redis`; time passes for real)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.errors import StateUnavailable
from worker.quota.circuit import AccountCircuit
from worker.quota.circuit_memory import MemoryAccountCircuit
from worker.quota.circuit_redis import RedisAccountCircuit, read_pause_sync
from worker.quota.state import state_redis


@dataclass
class Harness:
    name: str
    make: Callable[[], AccountCircuit]
    advance: Callable[[float], Any]
    url: str | None = None


@dataclass
class FakeClock:
    now: float = 5_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        shared = MemoryAccountCircuit(clock)

        async def advance_fake(dt: float) -> None:
            clock.now += dt

        # Every "process" of the memory twin is the same object.
        yield Harness("memory", lambda: shared, advance_fake)
        return
    url = request.getfixturevalue("clean_redis")
    clients = []

    def make_redis() -> AccountCircuit:
        # Each call is another process's view: its own connection, same keys.
        client = state_redis(url)
        clients.append(client)
        return RedisAccountCircuit(client)

    yield Harness("redis", make_redis, asyncio.sleep, url)
    for client in clients:
        await client.aclose()


async def test_closed_until_opened_and_the_reason_is_kept(harness: Harness) -> None:
    circuit = harness.make()
    assert await circuit.pause() is None
    before = datetime.now(UTC)
    assert await circuit.open("ResourceUnavailable.InArrears", "account in arrears")
    pause = await harness.make().pause()
    assert pause is not None
    assert (pause.code, pause.message) == ("ResourceUnavailable.InArrears", "account in arrears")
    assert before - timedelta(seconds=1) <= pause.since <= datetime.now(UTC)


async def test_only_the_first_opener_is_told_it_opened(harness: Harness) -> None:
    circuits = [harness.make() for _ in range(8)]
    opened = await asyncio.gather(
        *(c.open(f"Code{i}", f"message {i}") for i, c in enumerate(circuits))
    )
    assert sorted(opened) == [False] * 7 + [True]
    winner = opened.index(True)
    pause = await circuits[0].pause()
    assert pause is not None and pause.code == f"Code{winner}"
    # A later opener does not overwrite the reason.
    assert not await circuits[1].open("LimitExceeded", "other")
    pause = await circuits[2].pause()
    assert pause is not None and pause.code == f"Code{winner}"


async def test_close_resumes_and_a_new_opening_is_reported_again(harness: Harness) -> None:
    circuit = harness.make()
    assert await circuit.open("UnauthorizedOperation", "no permission")
    await harness.make().close()
    assert await circuit.pause() is None
    assert await circuit.open("ActionOffline", "offline")
    pause = await circuit.pause()
    assert pause is not None and pause.code == "ActionOffline"


async def test_one_probe_per_interval_across_the_fleet(harness: Harness) -> None:
    circuits = [harness.make() for _ in range(8)]
    await circuits[0].open("ResourceUnavailable.InArrears", "in arrears")
    claims = await asyncio.gather(*(c.claim_probe(0.3) for c in circuits))
    assert sorted(claims) == [False] * 7 + [True]
    await harness.advance(0.1)
    assert not any(await asyncio.gather(*(c.claim_probe(0.3) for c in circuits)))
    await harness.advance(0.3)
    claims = await asyncio.gather(*(c.claim_probe(0.3) for c in circuits))
    assert sorted(claims) == [False] * 7 + [True]


async def test_closing_clears_the_probe_interval(harness: Harness) -> None:
    circuit = harness.make()
    await circuit.open("IpNotInWhitelist", "ip")
    assert await circuit.claim_probe(60)
    await circuit.close()
    await circuit.open("IpNotInWhitelist", "ip again")
    assert await circuit.claim_probe(60)


async def test_unreachable_state_fails_closed(harness: Harness) -> None:
    if harness.name == "memory":
        pytest.skip("the in-memory twin has no shared state to lose")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = state_redis(f"redis://127.0.0.1:{port}/0")
    circuit = RedisAccountCircuit(client)
    started = time.monotonic()
    try:
        with pytest.raises(StateUnavailable):
            await circuit.pause()
        with pytest.raises(StateUnavailable):
            await circuit.open("LimitExceeded", "x")
        with pytest.raises(StateUnavailable):
            await circuit.claim_probe(1)
        with pytest.raises(StateUnavailable):
            await circuit.close()
        with pytest.raises(StateUnavailable):
            read_pause_sync(f"redis://127.0.0.1:{port}/0")
    finally:
        await client.aclose()
    assert time.monotonic() - started < 10  # short timeouts: the caller is not stuck


async def test_read_pause_sync_shows_the_fleet_pause(harness: Harness) -> None:
    if harness.name == "memory":
        pytest.skip("read_pause_sync reads Redis; the twin is read through pause()")
    assert harness.url is not None
    assert read_pause_sync(harness.url) is None
    await harness.make().open("AuthFailure.SecretIdNotFound", "secret id not found")
    pause = read_pause_sync(harness.url)
    assert pause is not None
    assert (pause.code, pause.message) == ("AuthFailure.SecretIdNotFound", "secret id not found")
    # Another prefix is another circuit.
    assert read_pause_sync(harness.url, key_prefix="macao-ocr:circuit:other") is None
