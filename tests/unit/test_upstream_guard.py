"""The Celery and kombu internals we copy, override or rely on, pinned by their source.

`worker.broker` is the one place that reaches into them (see its modules' docs, and
bench/README.md for what each buys). An upgrade that changes any of these methods fails
here, naming it: read the new upstream source, port our override (or drop it), re-measure,
and only then record the new digest. pyproject.toml pins celery and kombu to the minor
versions these digests were taken from.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version
from typing import Any

import pytest
from celery.worker.consumer import consumer as _celery_consumer
from kombu.transport import redis as _kombu_redis
from kombu.transport import virtual

# Neither ships types for these internals.
celery_consumer: Any = _celery_consumer
kombu_redis: Any = _kombu_redis
CELERY_VERSION = version("celery")
KOMBU_VERSION = version("kombu")

# What we do with each: copied (our code is a line-for-line copy plus a change), overridden
# (our method replaces it and calls it), relied on (we call it or depend on its behaviour).
GUARDED: dict[str, tuple[Any, str, str]] = {
    "kombu.transport.redis.QoS.append": (kombu_redis.QoS.append, "copied", "35c655f6ecc62fe6"),
    "kombu.transport.redis.QoS.ack": (kombu_redis.QoS.ack, "overridden", "1bc15a4ddf541af6"),
    "kombu.transport.redis.QoS.pipe_or_acquire": (
        kombu_redis.QoS.pipe_or_acquire,
        "relied on",
        "ad7f549d96c81107",
    ),
    "kombu.transport.virtual.QoS.append": (virtual.QoS.append, "relied on", "b388f0cd6485c28a"),
    "kombu.transport.virtual.QoS.ack": (virtual.QoS.ack, "relied on", "0714292b916fecb2"),
    "kombu.transport.redis.Channel._create_client": (
        kombu_redis.Channel._create_client,
        "overridden",
        "dae92bc4075dafb9",
    ),
    "kombu.transport.redis.Channel.close": (
        kombu_redis.Channel.close,
        "overridden",
        "101e9b9cdad44b88",
    ),
    # Our close unblocks the connection `_brpop_start` leaves in `_in_poll`, whose reply
    # kombu's close then reads with `_brpop_read`.
    "kombu.transport.redis.Channel._brpop_start": (
        kombu_redis.Channel._brpop_start,
        "relied on",
        "06723d707ddf2240",
    ),
    "kombu.transport.redis.Channel._brpop_read": (
        kombu_redis.Channel._brpop_read,
        "relied on",
        "c42518699709f2df",
    ),
    "kombu.transport.redis.Transport.register_with_event_loop": (
        kombu_redis.Transport.register_with_event_loop,
        "overridden",
        "4b835642e4a99425",
    ),
    "celery.worker.consumer.Consumer.on_send_event_buffered": (
        celery_consumer.Consumer.on_send_event_buffered,
        "overridden",
        "0429cadc8bf9dc54",
    ),
    "celery.worker.consumer.Consumer._flush_events": (
        celery_consumer.Consumer._flush_events,
        "relied on",
        "2f39dd2416515bf0",
    ),
    "celery.worker.consumer.Consumer.shutdown": (
        celery_consumer.Consumer.shutdown,
        "overridden",
        "a081dc7db4a98b33",
    ),
}


def source_digest(obj: Any) -> str:
    """The first 16 hex digits of the SHA-256 of the object's source text."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_upstream_source_is_the_one_we_reviewed(name: str) -> None:
    obj, use, digest = GUARDED[name]
    assert source_digest(obj) == digest, (
        f"{name} ({use} by worker.broker) changed upstream in celery {CELERY_VERSION} / "
        f"kombu {KOMBU_VERSION}: review worker/broker/ against it, then update the digest"
    )


def test_the_installed_versions_are_the_pinned_minors() -> None:
    assert CELERY_VERSION.startswith("5.7."), CELERY_VERSION
    assert KOMBU_VERSION.startswith("5.7."), KOMBU_VERSION


def test_the_digest_notices_a_change() -> None:
    def one() -> int:
        return 1

    def two() -> int:
        return 2

    assert source_digest(one) != source_digest(two)
