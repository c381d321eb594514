"""kombu's Redis transport, reusing one client object for its short commands.

kombu builds a new `redis.Redis` for every ack, every publish and every unacked-index write
(`Channel.conn_or_acquire`), and redis-py's constructor fills a table of ~200 response
callbacks each time: about 100 us per message on a slow core, several times per job. The
client is only a handle on the channel's connection pool (each command takes a pooled
connection and returns it), so one per pool does the same work. Anything else is kombu's.

Selected by `broker_transport` for redis:// and rediss:// URLs (`worker.celery_app`).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

# kombu ships no types for this module.
_BaseChannel: Any = kombu_redis.Channel
_BaseTransport: Any = kombu_redis.Transport


class Channel(_BaseChannel):  # type: ignore[misc]
    """A Redis channel whose synchronous client is built once per connection pool."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        # A reconnect replaces the pool (`_disconnect_pools`): follow it.
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(_BaseTransport):  # type: ignore[misc]
    """kombu's Redis transport with `Channel` above."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
