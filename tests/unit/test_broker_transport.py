"""The broker transport reuses one Redis client per pool and follows a reconnect."""

from __future__ import annotations

from worker.broker_transport import Channel, Transport
from worker.celery_app import create_app
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
