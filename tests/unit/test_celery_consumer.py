"""The consumer's batched task events: one publish per spell, not one per loop turn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from worker.broker import consumer as celery_consumer
from worker.broker.consumer import EVENT_FLUSH_S, Consumer


class FakeHub:
    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.later.append((delay_s, callback))

    def turn(self) -> None:
        todo, self.soon = self.soon, []
        for callback in todo:
            callback()


class FakeDispatcher:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def consumer() -> tuple[Any, FakeHub, FakeDispatcher]:
    c: Any = object.__new__(Consumer)
    c.hub, c.event_dispatcher = FakeHub(), FakeDispatcher()
    return c, c.hub, c.event_dispatcher


def test_a_spell_of_events_is_one_flush_after_the_delay() -> None:
    c, hub, dispatcher = consumer()
    for _ in range(50):
        c.on_send_event_buffered()
    assert len(hub.soon) == 1  # one wake-up of the loop, not fifty
    hub.turn()
    assert dispatcher.flushes == 0  # nothing published at the next turn
    [(delay_s, fire)] = hub.later
    assert delay_s == EVENT_FLUSH_S
    for _ in range(10):
        c.on_send_event_buffered()
    assert hub.soon == []  # still armed: these ride along
    fire()
    assert dispatcher.flushes == 1
    # Disarmed: the next event arms the next flush.
    c.on_send_event_buffered()
    hub.turn()
    assert len(hub.later) == 2


def test_shutdown_publishes_what_is_still_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    c, _, dispatcher = consumer()
    order: list[str] = []
    monkeypatch.setattr(dispatcher, "flush", lambda: order.append("flush"))
    monkeypatch.setattr(
        celery_consumer._BaseConsumer, "shutdown", lambda self: order.append("down")
    )
    c.on_send_event_buffered()
    c.shutdown()
    assert order == ["flush", "down"]


def test_the_app_runs_this_consumer() -> None:
    from worker.app import create_app
    from worker.settings import Settings

    app = create_app(Settings(database_url="sqlite:///unused.db"))
    assert app.conf.worker_consumer == f"{Consumer.__module__}:{Consumer.__name__}"


def test_broker_tweaks_off_runs_celery_and_kombu_as_shipped() -> None:
    from celery.worker.consumer import Consumer as CeleryConsumer

    from worker.app import create_app
    from worker.settings import Settings

    app = create_app(Settings(database_url="sqlite:///unused.db", broker_tweaks=False))
    assert app.conf.worker_consumer == f"{CeleryConsumer.__module__}:{CeleryConsumer.__name__}"
    assert app.conf.broker_transport is None
    tuned = create_app(Settings(database_url="sqlite:///unused.db"))
    assert tuned.conf.broker_transport == "worker.broker.transport:Transport"
