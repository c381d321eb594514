"""kombu's Redis transport, reusing one client object for its short commands.

kombu builds a new `redis.Redis` for every ack, every publish and every unacked-index write
(`Channel.conn_or_acquire`), and redis-py's constructor fills a table of ~200 response
callbacks each time: about 100 us per message on a slow core, several times per job. The
client is only a handle on the channel's connection pool (each command takes a pooled
connection and returns it), so one per pool does the same work. Anything else is kombu's.

Acks, too, are kombu's, but written with the next delivery's bookkeeping. kombu removes an
acked message from its unacked index in a round trip of its own, on the consumer thread,
right after it records the next delivery there in another: about 5% of a one-process
worker's samples holding the GIL at 200 jobs/s. Here an ack waits for the next delivery's
pipeline (or ACK_FLUSH_S, or the channel's close) and rides along. An ack lost with the
process only leaves its message to come back after the visibility timeout, and the claim,
not the broker, decides that a finished job is not run again. Without an event loop
(nothing would flush them) acks go out at once, as kombu's do.

An idle consumer waits in BRPOP for BRPOP_TIMEOUT_S rather than kombu's 1 s: a message
wakes it at once whatever the timeout, so the timeout only sets how often an idle worker
wakes to ask again (once a second was most of an idle consumer's wake-ups). It also adds to
kombu's overdue check on that connection (reconnect after brpop_timeout +
health_check_interval without a reply: 30 s instead of 26 s on a half-open socket); a broker
that restarts or closes the connection is seen at once, as before. A channel closing with a
BRPOP in flight does not wait it out: kombu's close reads the BRPOP's reply (dropping the
connection could lose a message popped for it), which would hold every warm shutdown up to
BRPOP_TIMEOUT_S. The close first asks Redis to unblock that connection (CLIENT UNBLOCK, from
another pooled connection), so the reply, empty or a message, comes at once.

Selected by `broker_transport` for redis:// URLs (`worker.app`).
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

# kombu ships no types for this module.
_BaseChannel: Any = kombu_redis.Channel
_BaseTransport: Any = kombu_redis.Transport
_BaseQoS: Any = kombu_redis.QoS
_VirtualQoS: Any = virtual.QoS

# The longest an ack waits for a delivery to ride on, when none comes.
ACK_FLUSH_S = 0.05
# How long one BRPOP blocks on an empty queue (kombu's: 1 s); see the module doc.
BRPOP_TIMEOUT_S = 5


class QoS(_BaseQoS):  # type: ignore[misc]
    """kombu's Redis QoS, writing pending acks in the next delivery's pipeline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Delivery tags acked but still in the unacked index, and when the first was.
        self._acked: list[str] = []
        self._acked_since = 0.0

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivery as kombu does, removing the pending acks in the same pipeline."""
        delivery = message.delivery_info
        raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            self._remove_acked(pipe)
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, raw)
            pipe.execute()
            _VirtualQoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Acknowledge now in memory; in Redis with the next delivery (see module doc)."""
        if self.channel.closed or not self.channel.connection.flushes_acks:
            # As kombu's (a closed channel's pending acks would never be flushed).
            super().ack(delivery_tag)
            return
        if not self._acked:
            self._acked_since = time.monotonic()
        self._acked.append(delivery_tag)
        _VirtualQoS.ack(self, delivery_tag)

    def flush_acks(self, older_than_s: float = 0.0) -> None:
        """Remove the pending acks from the unacked index if the oldest is old enough."""
        if self._acked and time.monotonic() - self._acked_since >= older_than_s:
            with self.pipe_or_acquire() as pipe:
                self._remove_acked(pipe)
                pipe.execute()

    def _remove_acked(self, pipe: Any) -> None:
        # Taken off the list before the pipeline runs: if it fails, those messages come
        # back after the visibility timeout, which the claim makes harmless.
        tags, self._acked = self._acked, []
        for tag in tags:
            pipe.zrem(self.unacked_index_key, tag)
            pipe.hdel(self.unacked_key, tag)


class Channel(_BaseChannel):  # type: ignore[misc]
    """A Redis channel whose synchronous client is built once per connection pool, and
    whose acks ride on the next delivery."""

    QoS = QoS
    _sync_client: Any = None

    def close(self) -> None:
        """Write the pending acks, end a BRPOP in flight, then close as kombu does."""
        if not self.closed and self._qos is not None:
            # Unwritten, they come back after the visibility timeout (see the module doc).
            with contextlib.suppress(*self.connection.connection_errors):
                self._qos.flush_acks()
        if self._in_poll:
            # Refused (an ACL without CLIENT, say) or unreachable: kombu's close as before.
            errors = (*self.connection.connection_errors, self.ResponseError, OSError)
            with contextlib.suppress(*errors):
                self._unblock_poll(self._in_poll)
        super().close()

    def _unblock_poll(self, connection: Any) -> None:
        """Make the BRPOP blocked on `connection` reply now (nil, or the message it popped):
        kombu's close reads that reply. Found by its address in CLIENT LIST; not found (a
        proxy, a Unix socket), the close waits for the reply as kombu's does."""
        sock = getattr(connection, "_sock", None)
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host, port = sock.getsockname()[:2]
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        client = self._create_client()  # pooled: never the blocked connection
        for entry in client.client_list(_type="normal"):
            if entry.get("addr") == addr:
                client.client_unblock(int(entry["id"]))
                return

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
    brpop_timeout = BRPOP_TIMEOUT_S
    # Whether an event loop flushes the channels' pending acks (only then are they held).
    flushes_acks = False

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """kombu's registration, plus a check at every turn for acks left waiting."""
        super().register_with_event_loop(connection, loop)
        loop.on_tick.add(self._flush_waiting_acks)
        self.flushes_acks = True

    def _flush_waiting_acks(self) -> None:
        for channel in self.channels:
            if not channel.closed and channel._qos is not None:
                channel._qos.flush_acks(older_than_s=ACK_FLUSH_S)


TRANSPORT = f"{__name__}:Transport"
