"""The broker transport reuses one Redis client per pool, follows a reconnect, and writes
acks with the next delivery."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kombu.asynchronous import Hub

from worker.app import create_app
from worker.broker.transport import ACK_FLUSH_S, Channel, Transport
from worker.settings import Settings


def test_redis_urls_use_our_transport_and_one_client_per_pool() -> None:
    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/9"))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.channel()
        assert isinstance(channel, Channel)
        first = channel._create_client()
        assert channel._create_client() is first
        assert first.connection_pool is channel.pool
        # A reconnect drops the pools; the next client must sit on the new one.
        channel._disconnect_pools()
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        # The asynchronous (BRPOP) client is kombu's own, on its own pool.
        assert channel._create_client(asynchronous=True).connection_pool is channel.async_pool
        channel.close()
    app.close()


def test_other_schemes_keep_kombus_transport() -> None:
    app = create_app(Settings(broker_url="rediss://127.0.0.1:6380/0"))
    assert app.conf.broker_transport is None
    app.close()


def test_an_ack_rides_on_the_next_delivery_or_goes_out_when_none_comes() -> None:
    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/9"))
    queue = f"test-acks-{uuid.uuid4().hex[:8]}"
    with app.connection_for_write() as conn:
        channel: Any = conn.channel()
        client = channel.client
        for n in range(5):
            channel.basic_publish(channel.prepare_message(f"m{n}"), exchange="", routing_key=queue)

        def unacked(*messages: Any) -> list[bool]:
            return [bool(client.hexists(channel.unacked_key, m.delivery_tag)) for m in messages]

        # No event loop to flush them: an ack goes out at once, as kombu's does.
        m0 = channel.basic_get(queue)
        assert unacked(m0) == [True]
        channel.basic_ack(m0.delivery_tag)
        assert unacked(m0) == [False]

        hub = Hub()
        transport: Any = conn.transport
        transport.register_with_event_loop(conn.connection, hub)
        assert transport._flush_waiting_acks in hub.on_tick
        m1 = channel.basic_get(queue)
        channel.basic_ack(m1.delivery_tag)
        assert unacked(m1) == [True]  # held, not a round trip of its own
        m2 = channel.basic_get(queue)
        assert unacked(m1, m2) == [False, True]  # written with m2's delivery

        channel.basic_ack(m2.delivery_tag)
        transport._flush_waiting_acks()
        assert unacked(m2) == [True]  # too fresh to flush alone
        time.sleep(ACK_FLUSH_S)
        transport._flush_waiting_acks()
        assert unacked(m2) == [False]  # no delivery came: flushed by itself

        m3 = channel.basic_get(queue)
        channel.basic_ack(m3.delivery_tag)
        channel.close()  # the close writes what is pending
        assert unacked(m3) == [False]
        hub.close()
        client.delete(queue)
    app.close()


def test_an_idle_consumer_waits_longer_but_a_message_wakes_it_at_once() -> None:
    import threading

    from kombu import Consumer
    from kombu import Queue as KombuQueue

    from worker.broker.transport import BRPOP_TIMEOUT_S

    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/9"))
    queue = f"test-brpop-{uuid.uuid4().hex[:8]}"
    got: list[float] = []
    with app.connection_for_write() as conn:
        channel: Any = conn.channel()
        assert channel.brpop_timeout == BRPOP_TIMEOUT_S > 1
        consumer = Consumer(
            channel,
            [KombuQueue(queue, routing_key=queue)],
            callbacks=[lambda _body, _message: got.append(time.monotonic())],
            no_ack=True,
        )
        consumer.consume()
        other = conn.clone()
        publisher: Any = other.channel()
        sent: list[float] = []

        def send() -> None:
            time.sleep(0.3)
            sent.append(time.monotonic())
            publisher.basic_publish(publisher.prepare_message("m"), exchange="", routing_key=queue)

        thread = threading.Thread(target=send)
        thread.start()
        # drain_events sends one BRPOP with the channel's timeout and reads its reply.
        conn.drain_events(timeout=BRPOP_TIMEOUT_S + 2)
        thread.join()
        assert got and got[0] - sent[0] < 0.5
        other.close()
        consumer.cancel()
        channel.close()
    app.close()


def test_a_close_with_a_brpop_in_flight_does_not_wait_it_out() -> None:
    """A warm shutdown closes the consumer's channel: it must not sit out the 5-s BRPOP."""
    from kombu import Consumer
    from kombu import Queue as KombuQueue

    from worker.broker.transport import BRPOP_TIMEOUT_S

    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/9"))
    queue = f"test-close-{uuid.uuid4().hex[:8]}"
    with app.connection_for_write() as conn:
        channel: Any = conn.channel()
        consumer = Consumer(channel, [KombuQueue(queue, routing_key=queue)], no_ack=True)
        consumer.consume()
        # What the event loop's poller does for an idle consumer: pin a connection, BRPOP.
        channel.client.connection = channel.client.connection_pool.get_connection()
        channel._brpop_start()
        assert channel._in_poll
        time.sleep(0.2)  # blocked in Redis now
        started = time.monotonic()
        channel.close()
        assert time.monotonic() - started < BRPOP_TIMEOUT_S / 5
        # The BRPOP is over in Redis too: a message sent now stays in the queue.
        other = conn.clone()
        publisher: Any = other.channel()
        publisher.basic_publish(publisher.prepare_message("m"), exchange="", routing_key=queue)
        time.sleep(0.2)
        assert publisher.client.llen(queue) == 1
        publisher.client.delete(queue)
        other.close()
    app.close()


def test_a_refused_unblock_closes_as_kombu_does() -> None:
    """CLIENT refused (an ACL, say): the close waits for the BRPOP's reply, never fails."""
    import redis
    from kombu import Consumer
    from kombu import Queue as KombuQueue

    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/9"))
    queue = f"test-refused-{uuid.uuid4().hex[:8]}"

    class NoClientCommands:
        def client_list(self, **_: Any) -> Any:
            raise redis.ResponseError("NOPERM this user has no permissions to run 'client'")

    with app.connection_for_write() as conn:
        channel: Any = conn.channel()
        Consumer(channel, [KombuQueue(queue, routing_key=queue)], no_ack=True).consume()
        channel.brpop_timeout = 1  # what the close then waits out
        channel.client.connection = channel.client.connection_pool.get_connection()
        channel._brpop_start()
        channel._create_client = lambda asynchronous=False: NoClientCommands()
        time.sleep(0.1)
        started = time.monotonic()
        channel.close()
        assert channel.closed
        assert 0.5 < time.monotonic() - started < 3
    app.close()
